"""Database, credentials, quota, admin REST API and the vb.cfg NATS API."""

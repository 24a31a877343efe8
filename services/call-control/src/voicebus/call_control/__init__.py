"""The only service that calls carrier REST APIs."""

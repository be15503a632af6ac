"""Authentication-Results (RFC 8601): :mod:`.parse` reads the fields other
hosts wrote; :mod:`.render` writes ours."""

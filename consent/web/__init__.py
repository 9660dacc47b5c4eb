"""The HTTP layer: the routes table, handlers, middleware, schemas of responses, pages and static files."""

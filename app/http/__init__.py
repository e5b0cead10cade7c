"""The HTTP face: routes, dependencies, upload reading, schemas, error shape, auth, docs, viewer."""

"""Serving pieces that need no Ray: config, request/response schemas, generation and verification
engine, API-key check. The Ray Serve application that uses them is `ray_unlearn.serve`."""

"""Serving pieces that need no Ray: config, request/response schemas, generation and verification
engine, continuous-batching scheduler, LoRA adapters on a shared base model, API-key check. The Ray
Serve application that uses them is `ray_unlearn.serve`."""

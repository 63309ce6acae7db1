"""DiT model families, one file each (flux.py, ...). Import the family module you need; nothing is imported here
so that loading one family never pulls in another."""

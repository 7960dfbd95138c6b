"""
Upload offload (the C{upload} filter's parts): object storage, the streaming form rewrite, the signature.
"""

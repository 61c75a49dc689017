"""The SHA-256 of a file's bytes, read in 1 MiB blocks: what the font manifest and the embeddings cache key on."""
import hashlib


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()

"""Batches from a dataset to the device: the DataLoader around TripletBatches/ImageBatches (a dead worker is
named with the image it read), resuming mid-epoch (SkipSampler), and uint8 images to normalised input (to_input)."""
import os

import torch
from torch.utils.data import DataLoader, Sampler

from csnlib.image_cache import ReadTracker
from triplet_image_loader import IMAGENET_MEAN, IMAGENET_STD, DataError


class SkipSampler(Sampler):
    """The first `skip` indices of a sampler left out: resuming mid-epoch continues the same order."""

    def __init__(self, sampler, skip=0):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        it = iter(self.sampler)
        for _ in range(self.skip):
            next(it, None)
        return it

    def __len__(self):
        return max(0, len(self.sampler) - self.skip)


def make_loader(dataset, batch_sampler, workers, device):
    """Batches from the dataset; a worker process that dies is reported with the image it was reading, or as a lack of
    shared memory when that is what killed it."""
    store = dataset.store
    if workers > 0 and store.tracker is None:
        store.tracker = ReadTracker(workers)
    loader = DataLoader(dataset, sampler=batch_sampler, batch_size=None, num_workers=workers,
                        pin_memory=device.type == 'cuda', prefetch_factor=4 if workers > 0 else None)
    try:
        yield from loader
    except RuntimeError as e:
        if 'DataLoader worker' not in str(e) or store.tracker is None:
            raise
        if shared_memory_failure(str(e)):
            raise DataError(shm_message(str(e), workers)) from None
        paths = [store.info.image_path(i) for i in store.tracker.reading()]
        raise DataError(f'a DataLoader worker died ({str(e).splitlines()[0]}) while reading '
                        f'{", ".join(paths) or "no image"}. Check that image, or run with --workers 0 to see the '
                        f'error in the main process') from None


def shared_memory_failure(text):
    """Whether a DataLoader error means the workers ran out of shared memory (/dev/shm) rather than a bad image: a
    bus error when a worker touches shared memory that is not there, or a failed write of a batch into it."""
    t = text.lower()
    return any(w in t for w in ('bus error', 'shared memory', 'shm', 'no space left on device'))


def shm_message(text, workers, shm='/dev/shm'):
    try:
        st = os.statvfs(shm)
        size = f' ({st.f_bavail * st.f_frsize / 2**20:.0f} MB free of {st.f_blocks * st.f_frsize / 2**20:.0f} MB)'
    except OSError:
        size = ''
    last = [ln for ln in text.strip().splitlines() if ln.strip()][-1].strip()[:200]
    return (f'the {workers} DataLoader workers ran out of shared memory in {shm}{size}: {last}. Not a bad image: in '
            f'docker give the container more (docker run --shm-size 2g, or --ipc host), or use fewer --workers '
            f'(--workers 0 reads in the main process and needs none)')


_NORM = {}  # device -> (mean, std) (1, 3, 1, 1), built once: a new tensor per call is a host-to-device copy per step


def normalisation(device):
    device = torch.device(device)
    if device not in _NORM:
        _NORM[device] = (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
                         torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))
    return _NORM[device]


def to_input(u8, device, channels_last, flip_gen=None):
    """uint8 images (N, S, S, 3) -> normalised float (N, 3, S, S) on the device; random horizontal flips if flip_gen.
    Nothing here waits for the device: the flips are drawn on the host and copied from pinned memory."""
    x = u8.to(device, non_blocking=True).permute(0, 3, 1, 2)  # (N, 3, S, S), channels_last strides
    x = x.float() if channels_last else x.contiguous().float()
    if flip_gen is not None:
        flip = torch.rand(x.shape[0], generator=flip_gen) < 0.5  # (N,) on the host
        if x.device.type == 'cuda':
            flip = flip.pin_memory()
        flip = flip.to(x.device, non_blocking=True)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    mean, std = normalisation(x.device)
    return (x / 255.0 - mean) / std

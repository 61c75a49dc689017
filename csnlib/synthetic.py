"""A synthetic dataset in the layout of UT-Zappos50K and the CSN triplets: shoe-like drawings whose class, closure,
gender and heel can be seen, offline, of any size (get_data.py --dataset synthetic, bench.py --make-data, the tests)."""
import json
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from csnlib.dataset_writer import Staging, sample_triplets, write_triplets
from csnlib.errors import GetDataError
from triplet_image_loader import ZAPPOS_IMAGES, ZAPPOS_NOTIONS, DataError

ZAPPOS_LABELS = {  # notion -> its values; the class values are Zappos's categories (the first folder level)
    'class': ['Shoes', 'Boots', 'Sandals', 'Slippers'],
    'closure': ['Lace up', 'Buckle', 'Slip-On', 'Zipper'],
    'gender': ['Men', 'Women', 'Boys', 'Girls'],
    'heel': ['Flat', '1in - 1 3-4in', '2in - 2 3-4in', '3in and over'],
}


SUBCATEGORIES = {'Shoes': ['Oxfords', 'Loafers', 'Sneakers and Athletic Shoes'], 'Boots': ['Ankle', 'Knee High'],
                 'Sandals': ['Flat', 'Heel'], 'Slippers': ['Slipper Flats', 'Slipper Heels']}


BRANDS = ['Bostonian', 'Clarks', 'Polo Ralph Lauren', 'Sperry Top-Sider', 'Co. Inc.']  # a folder name may end with '.'


def draw_shoe(labels, rng, size=(136, 102)):
    """A shoe-like drawing on white whose class, closure, gender and heel can be seen; JPEG-like texture."""
    cls, closure, gender, heel = labels
    W, H = size
    im = Image.new('RGB', size, (255, 255, 255))
    d = ImageDraw.Draw(im)
    colour = tuple(int(v) for v in rng.integers(20, 200, 3))
    scale = (1.0, 0.85, 0.75, 0.65)[gender]
    x0, x1 = W * (0.5 - 0.42 * scale), W * (0.5 + 0.42 * scale)
    sole_y = H * 0.78
    top = sole_y - H * (0.25, 0.62, 0.18, 0.15)[cls] * scale
    heel_h = H * 0.06 * heel
    d.polygon([(x0, sole_y - heel_h), (x0, top), (x0 + (x1 - x0) * 0.35, top), (x1, sole_y - H * 0.12), (x1, sole_y),
               (x0 + (x1 - x0) * 0.25, sole_y), (x0, sole_y - heel_h)], fill=colour)
    d.rectangle([x0, sole_y - heel_h, x0 + (x1 - x0) * 0.15, sole_y], fill=tuple(c // 2 for c in colour))
    if cls == 2:  # sandals: open straps
        for k in range(3):
            y = top + (sole_y - top) * (0.2 + 0.25 * k)
            d.rectangle([x0 + 8, y, x1 - 12, y + 4], fill=(255, 255, 255))
    mid = (x0 + x1) / 2
    if closure == 0:
        for k in range(4):
            d.line([mid - 10 + 6 * k, top + 4, mid - 4 + 6 * k, top + 14], fill=(250, 250, 250), width=2)
    elif closure == 1:
        d.rectangle([mid - 5, top + 4, mid + 5, top + 12], outline=(230, 200, 40), width=2)
    elif closure == 3:
        d.line([mid, top + 2, mid, sole_y - 6], fill=(180, 180, 180), width=2)
    arr = np.asarray(im.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.int16)
    shoe = arr.min(axis=2, keepdims=True) < 250
    arr = arr + np.where(shoe, rng.normal(0, 12, arr.shape), 0).astype(np.int16)  # leather-like texture
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_zappos_like(root, n_images=2000, seed=0, log=print):
    """A dataset in the layout of UT-Zappos50K and the CSN triplets (no dataset.json: the Zappos defaults apply).

    136x102 JPEGs under ut-zap50k-images/Category/SubCategory/Brand/ID.jpg, filenames.json, and
    tripletlists/{class,closure,gender,heel}_tripletlist_{train,val,test}.txt. Images are split into disjoint pools
    (test 1/4, val 1/8, train the rest); val and test hold three times as many triplets as images, as the paper's
    test split has many more triplets than images, and train four times."""
    if n_images < 32:
        raise DataError(f'--images {n_images}: use at least 32 images')
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=(n_images, len(ZAPPOS_NOTIONS)))  # (N, 4): one value per notion
    names = []
    for i in range(n_images):
        cat = ZAPPOS_LABELS['class'][labels[i, 0]]
        folder = os.path.join(cat, SUBCATEGORIES[cat][i % len(SUBCATEGORIES[cat])], BRANDS[i % len(BRANDS)])
        names.append(f'{folder}/{100000 + i}.{i % 97}.jpg')
        os.makedirs(os.path.join(root, ZAPPOS_IMAGES, folder), exist_ok=True)
        draw_shoe(labels[i], rng).save(os.path.join(root, ZAPPOS_IMAGES, names[-1]), quality=90)
    with open(os.path.join(root, 'filenames.json'), 'w') as f:
        f.write('\n'.join(names) + '\n')
    order = rng.permutation(n_images)
    n_test, n_val = n_images // 4, n_images // 8
    pools = {'test': order[:n_test], 'val': order[n_test:n_test + n_val], 'train': order[n_test + n_val:]}
    per_image = {'train': 4, 'val': 3, 'test': 3}
    for k, notion in enumerate(ZAPPOS_NOTIONS):
        for split, pool in pools.items():
            codes = np.full(n_images, -1)
            codes[pool] = labels[pool, k]                                # only this split's images take part
            n = per_image[split] * len(pool) // len(ZAPPOS_NOTIONS)
            write_triplets(root, notion, split, sample_triplets(codes, n, rng))
    log(f'wrote {n_images} images ({len(pools["test"])} test, {len(pools["val"])} val, {len(pools["train"])} train) '
        f'and triplet lists to {root}')


def build(out, n_images, seed, force=False, log=print):
    """get_data.py --dataset synthetic: make_zappos_like into OUT, built in a staging folder and moved into place when
    whole, with a manifest.json of its settings; a folder built with the same settings is kept as it is."""
    settings = {'dataset': 'synthetic', 'images': n_images, 'seed': seed}
    manifest = os.path.join(out, 'manifest.json')
    if os.path.exists(manifest) and not force:
        with open(manifest) as f:
            if json.load(f).get('settings') == settings:
                log(f'{out}: already built with the same settings ({n_images} images); --force rebuilds it')
                return out
    if os.path.isdir(out) and os.listdir(out) and not force and not os.path.exists(manifest):
        raise GetDataError(f'--out {out}: the folder exists and was not built by get_data.py; pick another --out '
                           f'or pass --force to replace it')
    with Staging(out, force) as tmp:
        make_zappos_like(tmp, n_images, seed, log=lambda *a: None)
        with open(os.path.join(tmp, 'manifest.json'), 'w') as f:
            json.dump({'settings': settings}, f, indent=1)
    log(f'wrote {n_images} synthetic Zappos-format images and their triplet lists to {out}')
    return out

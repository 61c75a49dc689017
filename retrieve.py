"""Use a trained model: nearest images under one notion of similarity, retrieval mAP, and pictures of what it learned.

    python retrieve.py --resume runs/csn/model_best.pth.tar --data data/fonts --query 123 --notion character --k 10
    python retrieve.py --resume runs/csn/model_best.pth.tar --query Roboto/a.png --notion font
        (a path in filenames.json)
    python retrieve.py --resume runs/csn/model_best.pth.tar --query ~/my_glyph.png --notion font  (any image file)
    python retrieve.py --resume runs/csn/model_best.pth.tar                  (only compute and cache the embeddings)
    python retrieve.py --resume runs/csn/model_best.pth.tar --export-db catalogue.lancedb    (and write them to LanceDB)

The embeddings of every image in filenames.json are computed once and cached next to the checkpoint (embeddings.npy,
masks.npy, images.txt, embeddings.json: see csnlib/search.py for their layout and what keys them).
"""
import argparse
import os
import re
import sys
import time

from PIL import Image

from csnlib.catalogue import notion_index_for
from csnlib.checkpoint import describe, trained_conditions
from csnlib.errors import UserError, run_script
from csnlib.onnx_export import check_target, export_onnx
from csnlib.options import add_device_flag, int_range, positive_int
from csnlib.pictures import plot_retrieval, short
from csnlib.runtime import keep_freed_memory
from csnlib.search import export_embeddings, load_cached_embeddings
from csnlib.trained_csn import load_trained
from csnlib.vector_db import export_catalogue, import_lancedb
from triplet_image_loader import (
    DataError,
    check_image_size,
    load_dataset_info,
    load_image,
    notion_index,
    read_labels,
)

MAX_K = 100  # neighbours in one picture: a row of 1 + k thumbnails, about 150 px each (15,000 px wide at most)


def build_parser():
    p = argparse.ArgumentParser(description='Nearest images of the dataset under one notion of similarity, from a '
                                            'trained checkpoint. Without --query: only compute and cache the '
                                            'embeddings.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    a = p.add_argument
    a('--resume', required=True, metavar='CKPT', help='checkpoint of main.py (e.g. runs/NAME/model_best.pth.tar)')
    a('--data', default=None, metavar='DIR', help='dataset folder (default: the one the checkpoint was trained on)')
    a('--query', default=None, help='an image index (row of filenames.json), a path listed in filenames.json, or any '
                                    'image file')
    a('--notion', default=None, help='the notion of similarity, by name or index (e.g. character, font, 0)')
    a('--k', type=int_range(1, MAX_K), default=10, help=f'number of neighbours: at most {MAX_K} (the picture is one '
                                                       f'row of them) and at most the other images of the '
                                                       f'dataset')
    a('--index', choices=['exact', 'ivf', 'hnsw'], default='exact',
      help='search: exact (faiss when faiss-cpu is installed, else numpy: the same neighbours), or faiss\'s '
           'approximate ivf (4-bit codes, 128 of the notion\'s sqrt(N) cells searched, 64 candidates re-ranked by '
           'exact distance; a mask model keeps its floats once for every notion) or hnsw (one notion\'s index) for '
           'galleries of millions (building one costs more than an exact search of one query; see the docs\' search '
           'table)')
    a('--out', default=None, metavar='PNG', help='picture of the query and its neighbours (default: '
                                                 'retrieval/<notion>_<query>.png in the checkpoint\'s folder)')
    a('--recompute', action='store_true', default=False, help='embed the dataset again even when the cache is valid')
    add_device_flag(p)
    a('--amp', choices=['auto', 'off', 'bf16', 'fp16'], default=None,
      help='mixed precision for embedding (default: the checkpoint\'s setting)')
    a('--batch-size', '--batch_size', type=positive_int, default=256,
      help='images per batch when embedding the dataset')
    a('--export-onnx', default=None, metavar='FILE',
      help='only write the model as ONNX to FILE (images (B, 3, S, S) and '
           'notion indices (B,) -> masked embeddings (B, D)); no dataset needed')
    a('--export-db', default=None, metavar='URI',
      help='also write the catalogue (image ids, paths, one vector per image for every notion, and the masks) to a '
           'LanceDB vector database at URI: a folder, s3://BUCKET/PATH, or db://NAME for LanceDB Cloud with '
           'LANCEDB_API_KEY set (pip install lancedb; mask models only; default: none)')
    return p


def resolve_query(query, info):
    """--query -> (image index or None, path of the image file), checked before anything is embedded."""
    n = len(info.filenames)
    index = {name: i for i, name in enumerate(info.filenames)}
    path = os.path.expanduser(query)
    if re.fullmatch(r'-?[0-9]+', query) and not os.path.isfile(path):
        i = int(query)
        if not 0 <= i < n:
            raise DataError(f'--query {query}: no such image index; the dataset has images 0..{n - 1}')
        return i, info.image_path(i)
    if query in index:
        return index[query], info.image_path(index[query])
    if not os.path.isfile(path):
        raise DataError(f'--query {query!r}: not an image index (0..{n - 1}), not a path listed in '
                        f'{os.path.join(info.root, "filenames.json")}, and no such image file')
    try:
        with Image.open(path) as im:
            check_image_size(im, f'--query {query!r}')  # from its header, before anything is decoded
            im.verify()
    except Image.DecompressionBombError as e:
        raise DataError(f'--query {query!r}: the image is too large to open safely ({e}); shrink it first') from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f'--query {query!r}: the file is not an image that PIL can read ({e})') from None
    rel = os.path.relpath(os.path.realpath(path), os.path.realpath(info.images_dir))
    return index.get(rel), path


def safe_name(text):
    """text as one file name: no folder separators, no leading dot (a notion name from a checkpoint is data)."""
    return re.sub(r'_+', '_', re.sub(r'[^\w.=+-]|\.\.+', '_', str(text))).lstrip('.')[:100] or '_'


def check_k(k, n, q_index):
    """--k against the images that can be neighbours (all of them but the query itself)."""
    candidates = n - (q_index is not None)
    if k > candidates:
        raise UserError(f'--k {k}: the dataset has {candidates} {"other " if q_index is not None else ""}images to '
                        f'choose from; use --k {max(candidates, 1)} or fewer')


def run(a):
    t_start = time.time()
    if a.export_onnx:
        check_target(a.export_onnx, a.resume)  # before the minutes a large checkpoint may take to load
    trained, ckpt, rt = load_trained(a.resume, device=a.device, amp=a.amp, data=a.data, batch_size=a.batch_size)
    model, args, device = trained.model, rt.args, rt.device
    if a.export_onnx:
        export_onnx(trained, a.export_onnx, source=a.resume)
        print(f'wrote {a.export_onnx}: {describe(args)}, images (B, 3, {args.image_size}, {args.image_size}), notions '
              f'{", ".join(f"{i}={n}" for i, n in enumerate(trained.notions))}')
        return 0
    info = load_dataset_info(args.data)
    if ckpt.get('notions') and ckpt['notions'] != info.notions:
        raise DataError(f'--resume {a.resume} was trained on notions {ckpt["notions"]}, '
                        f'but {args.data} has {info.notions}')
    # the notion and the query are checked before anything is embedded (embedding a dataset takes minutes)
    if a.query is not None and a.notion is None:
        raise DataError(f'--query needs --notion, one of {", ".join(info.notions)}')
    c = notion_index(a.notion, info.notions, trained_conditions(ckpt, info.notions)) if a.notion is not None else None
    q_index, q_path = resolve_query(a.query, info) if a.query is not None else (None, None)
    if a.export_db:
        import_lancedb()  # missing: say so now, not after minutes of embedding
        if trained.net.per_notion_backbone or not getattr(trained.net, 'per_notion_embedding', True):
            raise UserError(f'--export-db: {describe(args)} has no one embedding per image for every notion '
                            f'(one per notion, or masks weighed per triplet); export a CSN or triplet network')
    if a.query is not None:
        check_k(a.k, len(info.filenames), q_index)
    cache_dir = os.path.dirname(os.path.abspath(a.resume))
    cached = None if a.recompute else load_cached_embeddings(cache_dir, a.resume, info, args)
    if cached is not None:
        emb, masks = cached
        print(f'using cached embeddings {os.path.join(cache_dir, "embeddings.npy")} {tuple(emb.shape)}')
    else:
        keep_freed_memory(args, device)  # the command line's process only: load_model leaves malloc alone
        print(f'embedding the {len(info.filenames)} images of {info.root} with {describe(args)} on {device}')
        emb, masks = export_embeddings(model, info, rt, cache_dir)
    if a.export_db:
        t0 = time.time()
        export_catalogue(a.export_db, emb, masks, info.filenames, info.notions, trained.conditions)
        print(f'wrote the catalogue of {len(emb)} images and {len(info.notions)} notions to the LanceDB database '
              f'{a.export_db} (tables images and notions, {time.time() - t0:.1f} s)')
    if a.query is None:
        return 0
    name = info.notions[c]
    t0 = time.perf_counter()
    # a mask model: one index over f(x) for every notion; task-specific networks, ASEN or hnsw: this notion's own
    index = notion_index_for(emb, masks, a.index, info.notions, conditions=[c])
    build_ms = (time.perf_counter() - t0) * 1e3
    if q_index is None:  # an image from outside the dataset: embed it now
        raw = trained.embed(trained.transform(q_path)).cpu().numpy()  # (1, D), or (C, 1, D) one per notion
        q = (raw[c] if raw.ndim == 3 else raw)[0]  # (D,) raw
    else:
        q = index.row(q_index, c)
    t0 = time.perf_counter()
    idx, dist = index.search(q, a.k, c, exclude=q_index)
    idx, dist = idx[0], dist[0]
    search_ms = (time.perf_counter() - t0) * 1e3
    labels = read_labels(info) or {}
    lab = labels.get(name)
    q_lab = lab[q_index] if lab and q_index is not None else ''
    print(f'query: {q_index if q_index is not None else "(external)"} {q_path}'
          + (f'  {name}={q_lab}' if q_lab else ''))
    print(f'{a.k} nearest of {len(index)} images by {name} ({describe(args)}; index built in {build_ms:.0f} ms, '
          f'search {search_ms:.1f} ms):')
    print(f'{"rank":>4} {"index":>7} {"distance":>9}  {name if lab else "":<16} path')
    for r, (j, d) in enumerate(zip(idx, dist), 1):
        print(f'{r:>4} {j:>7} {d:>9.4f}  {(lab[j] if lab else ""):<16} {info.filenames[j]}')
    size = max(args.image_size, 64)
    q_tag = str(q_index) if q_index is not None else os.path.splitext(os.path.basename(q_path))[0]
    out = a.out or os.path.join(cache_dir, 'retrieval',
                                f'{safe_name(name)}_{safe_name(q_tag)}.png')  # in the run's folder
    neigh = [(load_image(info.image_path(j), size), f'{j}' + (f'\n{short(lab[j])}' if lab else '') + f'\n{d:.3f}',
              (lab[j] == q_lab) if lab and q_lab and lab[j] else None) for j, d in zip(idx, dist)]
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        plot_retrieval([(load_image(q_path, size), f'query {q_tag}' + (f'\n{short(q_lab)}' if q_lab else ''), neigh)],
                       out, f'{a.k} nearest by {name} ({describe(args)})')
    except OSError as e:  # a read-only run folder, a full disk
        raise UserError(f'cannot write the picture {out} ({e.strerror or e}); the neighbours are listed above. Give '
                        f'--out a file in a folder you can write to') from None
    print(f'wrote {out} ({time.time() - t_start:.1f} s in all)')
    return 0


def main(argv=None):
    return run(build_parser().parse_args(argv))


if __name__ == '__main__':
    sys.exit(run_script(main))

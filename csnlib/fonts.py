"""Fonts dataset: the 62 glyphs A-Z a-z 0-9 of installed font faces as 64x64 greyscale images, labelled from the files.

White glyph (255) on black (0). Each face gets one scale so that all its 62 glyphs fit inside the image (upper and lower
case keep their relative sizes); each glyph is centred horizontally and sits on the face's baseline, and the face's
block of glyphs is centred vertically. Labels come from the font files (fontTools): character, font (the family),
weight (bold when OS/2 usWeightClass >= 600) and slant (italic or oblique). get_data.py writes the dataset layout.
"""
import logging
import multiprocessing
import os
import re
import string
import unicodedata

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from csnlib.digest import file_sha256
from csnlib.errors import GetDataError

CHARS = string.ascii_uppercase + string.ascii_lowercase + string.digits  # 62 classes, in label order
SYSTEM_FONT_DIRS = ['/usr/share/fonts']
OUTLINE_EXTS = ('.ttf', '.otf', '.ttc', '.otc', '.woff', '.woff2')
TYPE1_EXTS = ('.pfb', '.pfa', '.t1')
FORMAT_RANK = {'.otf': 0, '.ttf': 1, '.ttc': 2, '.otc': 2, '.woff2': 3, '.woff': 4}  # which copy of a face to keep

# Words that name a weight, width or slope; stripped from the end of a family name ("Clear Sans Light" -> "Clear Sans").
STYLE_WORDS = {'thin', 'hairline', 'extralight', 'ultralight', 'light', 'book', 'regular', 'normal', 'medium', 'demi',
               'demibold', 'semibold', 'bold', 'extrabold', 'ultrabold', 'black', 'heavy', 'extrablack', 'ultra',
               'extra', 'semi', 'condensed', 'semicondensed', 'cond', 'narrow', 'compressed', 'extended', 'expanded',
               'wide', 'italic', 'oblique', 'slanted', 'inclined'}
BOLD_WORDS = re.compile(r'bold|black|heavy|demi|negrita|gras|fett', re.I)   # semibold, extrabold, demibold included
NOT_BOLD_WORDS = re.compile(r'thin|hairline|light|regular|book|roman|normal|medium|standard', re.I)
ITALIC_WORDS = re.compile(r'italic|oblique|slanted|inclined|kursiv|cursiva', re.I)
CAPS_NAME = re.compile(r'small ?caps|smallcaps|all ?sc\b|\bsc\b|\bcaps\b|unicase', re.I)
SYMBOL_NAME = re.compile(r'last ?resort|dingbat|wingding|webding|^(cmex|cmsy|msam|msbm|esint|wasy|stmary)\d', re.I)
# Letters whose lower case is not a small copy of the upper case in ordinary fonts: used to catch small caps.
DISTINCT_CASE = 'abdeghnqrt'
# capital_lookalikes() at or above this drops a face: 10 of the 1,042 faces the other filters keep reach it
# (0.7 to 1.0), the next ordinary face is at 0.5
CAPITAL_LOOKALIKES = 0.7


def slug(text):
    """Lower-case ASCII slug, safe as a folder name on case-insensitive file systems."""
    text = unicodedata.normalize('NFKD', text).encode('ascii', 'ignore').decode()
    return re.sub(r'[^a-z0-9]+', '-', text.lower()).strip('-') or 'x'


def key(text):
    return re.sub(r'[^a-z0-9]', '', unicodedata.normalize('NFKD', text).encode('ascii', 'ignore').decode().lower())


def find_font_files(dirs):
    """Font files under dirs (recursively, links resolved, each file once), sorted."""
    found = set()
    for d in dirs:
        if not os.path.isdir(d):
            raise GetDataError(f'--font-dir {d}: no such folder')
        for root, _, files in os.walk(d):
            for f in files:
                if f.lower().endswith(OUTLINE_EXTS + TYPE1_EXTS):
                    p = os.path.realpath(os.path.join(root, f))
                    if os.path.isfile(p):
                        found.add(p)
    return sorted(found)


def family_and_style(name_table):
    """(family, style) of a face. The typographic family (name 16) is used only when the legacy family (name 1)
    starts with it: a few files carry a wrong name 16 (GFS Artemisia Bold Italic says 'GFS Didot', Aerial says
    'sans')."""
    fam1 = (name_table.getDebugName(1) or '').strip()
    fam16 = (name_table.getDebugName(16) or '').strip()
    if fam16 and key(fam1).startswith(key(fam16)):
        family, style = fam16, (name_table.getDebugName(17) or name_table.getDebugName(2) or '').strip()
    else:
        family, style = fam1, (name_table.getDebugName(2) or '').strip()
    words = family.split()
    moved = []
    while len(words) > 1 and key(words[-1]) in STYLE_WORDS:
        moved.insert(0, words.pop())
    return ' '.join(words), ' '.join(moved + [style]).strip() or 'Regular'


def weight_label(weight_class, style, fs_bold):
    """'bold' or 'regular'. OS/2 usWeightClass >= 600 is bold, unless the class is nonsense (outside 100..1000, e.g.
    Sora's 32..190 or 28926) or the style name says otherwise ('Bold' with class 400): then the style name decides."""
    if 1 <= weight_class <= 9:          # old fonts store 1..9 for 100..900
        weight_class *= 100
    by_name = True if BOLD_WORDS.search(style) else (False if NOT_BOLD_WORDS.search(style) else None)
    valid = 100 <= weight_class <= 1000
    if valid and (by_name is None or by_name == (weight_class >= 600)):
        return 'bold' if weight_class >= 600 else 'regular'
    if by_name is not None:
        return 'bold' if by_name else 'regular'
    return 'bold' if fs_bold else 'regular'


def read_faces(path):
    """Every face in one font file: names, labels and the checks that need no rendering. Runs in a worker."""
    logging.getLogger('fontTools').setLevel(logging.ERROR)               # it warns about odd but harmless tables
    ext = os.path.splitext(path)[1].lower()
    base = {'path': path, 'format': ext, 'sha256': file_sha256(path)}
    if ext in TYPE1_EXTS:
        with open(path, 'rb') as f:
            m = re.search(rb'/FontName\s*/(\S+)', f.read(65536))
        return [dict(base, index=0, ps_name=m.group(1).decode('latin-1') if m else '', family='', style='',
                     drop='type1')]
    from fontTools.ttLib import TTCollection, TTFont
    try:
        if ext in ('.ttc', '.otc'):
            fonts = TTCollection(path, lazy=True).fonts
        else:
            fonts = [TTFont(path, lazy=True)]
    except Exception as e:  # noqa: BLE001 (any parse error means the file is unusable)
        return [dict(base, index=0, family='', style='', ps_name='', drop='unreadable', detail=str(e)[:200])]
    return [read_face(font, dict(base, index=i)) for i, font in enumerate(fonts)]


def read_face(font, rec):
    try:
        name = font['name']
        rec['family'], rec['style'] = family_and_style(name)
        rec['ps_name'] = (name.getDebugName(6) or '').strip()
        os2 = font['OS/2'] if 'OS/2' in font else None
        fs_sel = os2.fsSelection if os2 else 0
        mac = font['head'].macStyle
        angle = font['post'].italicAngle if 'post' in font else 0.0
        rec['weight_class'] = os2.usWeightClass if os2 else 400
        rec['weight'] = weight_label(rec['weight_class'], rec['style'], bool(fs_sel & 1 << 5 or mac & 1))
        italic = bool(fs_sel & 1 | fs_sel & 1 << 9 or mac & 2 or ITALIC_WORDS.search(rec['style']))
        rec['slant'] = 'italic' if italic or abs(angle) >= 3 else 'upright'
        rec['italic_angle'] = angle
        rec['variable'] = 'fvar' in font
        cmap = font.getBestCmap() or {}
        order = font.getGlyphOrder()
        glyphs = [cmap.get(ord(c)) for c in CHARS]
        missing = [c for c, g in zip(CHARS, glyphs) if g is None or g == order[0]]
        # fixed pitch, a label no notion trains on: the post table's isFixedPitch, or one advance width for all 62
        # characters (FreeMono, Inconsolata, Courier Prime and other monospace faces leave the flag at 0)
        widths = {font['hmtx'][g][0] for g in glyphs if g is not None}
        flagged = bool(font['post'].isFixedPitch) if 'post' in font else False
        rec['pitch'] = 'fixed' if flagged or len(widths) == 1 else 'proportional'
    except Exception as e:  # noqa: BLE001
        rec.update(drop='unreadable', detail=str(e)[:200])
        return rec
    full = f"{rec['family']} {rec['style']}"
    if missing:
        rec.update(drop='missing_chars', detail=''.join(missing))
    elif SYMBOL_NAME.search(rec['family']) or SYMBOL_NAME.search(rec['ps_name']):
        rec.update(drop='symbol_font', detail='name')
    elif os2 is not None and os2.panose.bFamilyType == 5:
        rec.update(drop='symbol_font', detail='OS/2 panose family type 5 (pictorial)')
    elif {(t.platformID, t.platEncID) for t in font['cmap'].tables} & {(3, 0), (3, 1), (3, 10)} == {(3, 0)}:
        rec.update(drop='symbol_font', detail='only a Windows symbol cmap')
    elif CAPS_NAME.search(full):
        rec.update(drop='caps_only', detail='name')
    else:
        same = [c for c in string.ascii_lowercase if cmap[ord(c)] == cmap[ord(c.upper())]]
        foreign = foreign_glyph_names(dict(zip(CHARS, glyphs)))
        if len(same) >= 13:
            rec.update(drop='caps_only', detail=f'{len(same)} lower-case letters map to the capital glyph')
        elif foreign['caps'] >= 13:
            rec.update(drop='caps_only', detail=f"{foreign['caps']} lower-case letters map to small-cap glyphs")
        elif foreign['other'] >= 10:
            rec.update(drop='symbol_font', detail=f"glyph names of other characters, e.g. {foreign['example']}")
    return rec


def foreign_glyph_names(glyph_of):
    """Count characters whose glyph is named after another character ('A' -> 'Alpha', 'a' -> 'A.sc')."""
    from fontTools.agl import AGL2UV
    caps, other, example = 0, 0, ''
    for c, g in glyph_of.items():
        base = g.split('.')[0].split('_')[0]
        named = AGL2UV.get(base)
        if named is None and re.fullmatch(r'uni[0-9A-F]{4}', base):
            named = int(base[3:], 16)
        if named is None or named == ord(c):
            if c.islower() and re.search(r'\.(sc|smcp|c2sc)$', g, re.I):
                caps += 1
            continue
        if c.islower() and named == ord(c.upper()):
            caps += 1
        else:
            other += 1
            example = example or f"'{c}' -> '{g}'"
    return {'caps': caps, 'other': other, 'example': example}


def ink(font, ch):
    """(ink image, (left, top) of the ink relative to the pen origin on the baseline), or (None, None) if blank."""
    l, t, r, b = font.getbbox(ch, anchor='ls')
    if r <= l or b <= t:
        return None, None
    im = Image.new('L', (r - l + 4, b - t + 4))
    ImageDraw.Draw(im).text((2 - l, 2 - t), ch, font=font, fill=255, anchor='ls')
    box = im.getbbox()
    if box is None:
        return None, None
    return im.crop(box), (box[0] + l - 2, box[1] + t - 2)


def render_face(path, index, size=64, margin=3, ref=200, supersample=4):
    """(62, size, size) uint8 glyphs of one face, or a string naming the characters that draw nothing. Glyphs are
    drawn at supersample times the size and shrunk, so that hinting (which differs between TrueType and CFF copies
    of one design) hardly changes the result and positions are exact to a fraction of a pixel."""
    font = ImageFont.truetype(path, ref, index=index, layout_engine=ImageFont.Layout.BASIC)
    boxes = [font.getbbox(c, anchor='ls') for c in CHARS]            # (left, top, right, bottom) from the origin
    blank = [c for c, b in zip(CHARS, boxes) if b[2] <= b[0] or b[3] <= b[1]]
    if blank:
        return ''.join(blank)
    top, bottom = min(b[1] for b in boxes), max(b[3] for b in boxes)
    width = max(b[2] - b[0] for b in boxes)
    big, room = size * supersample, (size - 2 * margin) * supersample
    scale = room / max(width, bottom - top)
    font = ImageFont.truetype(path, ref * scale, index=index, layout_engine=ImageFont.Layout.BASIC)
    baseline = margin * supersample + (room - (bottom - top) * scale) / 2 - top * scale
    out = np.zeros((len(CHARS), size, size), np.uint8)                # (62, H, W)
    for i, c in enumerate(CHARS):
        im, pos = ink(font, c)
        if im is None:
            return c
        canvas = Image.new('L', (big, big))
        canvas.paste(im, ((big - im.width) // 2, int(round(baseline + pos[1]))))
        out[i] = np.asarray(canvas.reduce(supersample))
    return out


def render_worker(job):
    """Pool worker: render one face and write its PNGs into the staging folder."""
    rec, staging, size = job
    try:
        glyphs = render_face(rec['path'], rec['index'], size)
    except Exception as e:  # noqa: BLE001 (FreeType refuses some files that fontTools reads)
        return rec['id'], f'unreadable: {str(e)[:200]}', None, None
    if isinstance(glyphs, str):
        return rec['id'], f'empty_glyph: {glyphs}', None, None
    caps = capital_lookalikes(glyphs)
    if caps >= CAPITAL_LOOKALIKES:
        return rec['id'], (f'caps_only: {caps:.0%} of {" ".join(DISTINCT_CASE)} are drawn like their own capital '
                           f'(small caps or unicase)'), None, None
    folder = os.path.join(staging, str(rec['id']))
    os.makedirs(folder, exist_ok=True)
    for c, g in zip(CHARS, glyphs):
        Image.fromarray(g).save(os.path.join(folder, f'U{ord(c):04X}.png'), optimize=False)
    small = glyphs.reshape(len(CHARS), size // 2, 2, size // 2, 2).mean((2, 4), dtype=np.float32) / 255
    return rec['id'], None, np.stack([shape_vector(g) for g in glyphs]), small   # (62, D), (62, size/2, size/2)


def case_vector(glyph, n=16):
    """(n*n,) unit vector of a glyph's ink stretched to a square: a small capital and its capital give the same vector
    whatever their size, and narrow letters of a condensed face stay apart."""
    im = Image.fromarray(np.where(glyph > 64, 255, 0).astype(np.uint8))
    box = im.getbbox()
    if box is None:
        return np.zeros(n * n, np.float32)
    im = im.crop(box).resize((2 * n, 2 * n), Image.BOX).filter(ImageFilter.GaussianBlur(1.5)).resize((n, n), Image.BOX)
    v = np.asarray(im, np.float32).ravel()
    v -= v.mean()
    return v / (np.linalg.norm(v) + 1e-6)


def capital_lookalikes(glyphs):
    """Share of the lower-case letters in DISTINCT_CASE whose closest capital of the same face is their own capital:
    about 0.2 in ordinary faces, 0.7 and more in small caps and unicase faces, whatever their names say."""
    upper = [c for c in CHARS if c.isupper()]
    caps = np.stack([case_vector(glyphs[CHARS.index(c)]) for c in upper])                  # (26, D)
    lower = np.stack([case_vector(glyphs[CHARS.index(c)]) for c in DISTINCT_CASE])         # (10, D)
    own = np.array([upper.index(c.upper()) for c in DISTINCT_CASE])
    return float(((lower @ caps.T).argmax(1) == own).mean())


def shape_vector(glyph, n=16):
    """(n*n,) unit vector of a glyph's shape whatever its size and weight: ink thresholded, cropped, padded to a
    square, blurred and shrunk. Used to tell whether a face draws letters, not to train anything."""
    im = Image.fromarray(np.where(glyph > 64, 255, 0).astype(np.uint8))
    box = im.getbbox()
    if box is None:
        return np.zeros(n * n, np.float32)
    im = im.crop(box)
    side = max(im.size)
    sq = Image.new('L', (side, side))
    sq.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
    sq = sq.resize((2 * n, 2 * n), Image.BOX).filter(ImageFilter.GaussianBlur(1.5)).resize((n, n), Image.BOX)
    v = np.asarray(sq, np.float32).ravel()
    v -= v.mean()
    return v / (np.linalg.norm(v) + 1e-6)


def letter_scores(vecs, groups, n_ref=250, seed=0, chunk=32):
    """For each face, (share of its glyphs recognised as their character, share of the lower-case letters in
    DISTINCT_CASE recognised as their capital). A glyph is recognised as the character of its nearest neighbour
    among the glyphs of up to n_ref reference faces of other families (cosine similarity of shape vectors)."""
    vecs = np.asarray(vecs, np.float32)                                  # (F, 62, D)
    groups = np.unique(groups, return_inverse=True)[1]
    F, C, D = vecs.shape
    ref = np.sort(np.random.default_rng(seed).permutation(F)[:n_ref])
    R = vecs[ref].reshape(-1, D)                                         # (n_ref*62, D)
    R_char = np.tile(np.arange(C), len(ref))
    R_group = np.repeat(groups[ref], C)
    letter = np.array([CHARS.index(c.lower()) if c.isalpha() else CHARS.index(c) for c in CHARS])
    lower = np.array([CHARS.index(c) for c in DISTINCT_CASE])
    nearest = np.zeros((F, C), int)
    for s in range(0, F, chunk):
        sim = vecs[s:s + chunk] @ R.T                                    # (f, 62, n_ref*62)
        same = groups[s:s + chunk, None] == R_group[None, :]             # (f, n_ref*62)
        sim[np.broadcast_to(same[:, None, :], sim.shape)] = -np.inf      # only other families vote
        nearest[s:s + chunk] = R_char[sim.argmax(-1)]
    right = (letter[nearest] == letter).mean(1)
    capsish = (nearest[:, lower] == lower - 26).mean(1)                  # 'a' is CHARS[26], 'A' is CHARS[0]
    return right, capsish


def clone_pairs(small, ids, tol):
    """(id_a, id_b, difference) for the faces whose renders differ by less than tol: the mean absolute difference
    of their 62 glyphs at 32x32, on a 0..1 scale. Candidates come from a cheap 16x16 pass: a mean absolute
    difference below tol implies a mean squared difference at 16x16 below tol."""
    g32 = np.stack(small).reshape(len(small), -1)                        # (F, 62*32*32)
    g16 = np.stack(small).reshape(len(small), len(CHARS), 16, 2, 16, 2).mean((3, 5)).reshape(len(small), -1)
    sq = (g16 ** 2).sum(1)
    ms = np.maximum(sq[:, None] + sq[None, :] - 2 * g16 @ g16.T, 0) / g16.shape[1]         # (F, F)
    pairs = []
    for i, j in zip(*np.nonzero(np.triu(ms < tol, 1))):
        d = float(np.abs(g32[i] - g32[j]).mean())
        if d < tol:
            pairs.append((ids[i], ids[j], d))
    return pairs


def build(font_dirs, staging, size=64, workers=None, max_faces=None, seed=0, clone_tol=0.004, same_name_tol=0.02,
          min_letters=0.05, max_capsish=0.5, log=print):
    """Read, check and render every face. Returns (kept, dropped): the kept faces (dicts with their labels; their
    PNGs are in staging/<id>/) and the dropped ones (dicts with 'drop', the reason, and 'detail')."""
    files = find_font_files(font_dirs)
    if not files:
        raise GetDataError(f'no font files under {", ".join(font_dirs)}; install the fonts with '
                         f'`bash setup.sh` (fonts/debian-font-packages.txt) or pass --font-dir DIR')
    workers = workers or os.cpu_count() or 1
    with multiprocessing.Pool(workers) as pool:
        faces = [f for rec in pool.imap(read_faces, files, chunksize=8) for f in rec]
        for i, f in enumerate(faces):
            f['id'] = i
        drop_type1_copies(faces)
        live = [f for f in faces if not f.get('drop')]
        if max_faces:
            live = pick_faces(live, max_faces, seed)
            chosen = {f['id'] for f in live}
            for f in faces:
                if not f.get('drop') and f['id'] not in chosen:
                    f['drop'] = 'not_picked'
        log(f'fonts: {len(files)} files, {len(faces)} faces, rendering {len(live)}')
        shapes, small = {}, {}
        jobs = [(f, staging, size) for f in live]
        for fid, problem, shape, sm in pool.imap_unordered(render_worker, jobs, chunksize=4):
            if problem:
                reason, _, detail = problem.partition(': ')
                faces[fid].update(drop=reason, detail=detail)
            else:
                shapes[fid], small[fid] = shape, sm
    live = [f for f in live if f['id'] in shapes]
    # Faces that draw something other than the letters (pictures, letters in boxes) or capitals for the lower case.
    if len({key(f['family']) for f in live}) >= 2:
        right, capsish = letter_scores([shapes[f['id']] for f in live], [key(f['family']) for f in live], seed=seed)
        for f, r, c in zip(live, right, capsish):
            f['letter_score'], f['caps_score'] = round(float(r), 3), round(float(c), 3)
            if r < min_letters:
                f.update(drop='not_letters', detail=f'only {r:.0%} of its glyphs look like their character')
            elif c >= max_capsish:
                f.update(drop='caps_only', detail=f'{c:.0%} of a b d e g h n q r t look like capitals')
    live = [f for f in live if not f.get('drop')]
    drop_clones(live, small, clone_tol)
    live = [f for f in live if not f.get('drop')]
    drop_same_names(live, small, same_name_tol)
    return [f for f in live if not f.get('drop')], [f for f in faces if f.get('drop')]


def add_label_column(labels_csv, name, values):
    """Add the column `name` to labels.csv, one value per row in its order (a label beside the notions)."""
    import csv
    with open(labels_csv, newline='') as f:
        rows = list(csv.reader(f))
    if len(rows) != len(values) + 1:
        raise ValueError(f'{labels_csv}: {len(rows) - 1} rows for {len(values)} values of {name}')
    with open(labels_csv, 'w', newline='') as f:
        csv.writer(f).writerows([rows[0] + [name]] + [r + [v] for r, v in zip(rows[1:], values)])


def drop_type1_copies(faces):
    """Type1 files are used only through their OTF/TTF twins (same PostScript name); FreeType's Type1 path gives
    no cmap to check, so a Type1 font without a twin is dropped as unsupported."""
    outline = {f['ps_name'] for f in faces if f['format'] not in TYPE1_EXTS and f.get('ps_name')}
    for f in faces:
        if f.get('drop') == 'type1':
            f.update(drop='type1_copy' if f['ps_name'] in outline else 'type1_unsupported', detail=f['ps_name'])


def preference(f):
    """Sort key: which of several copies or clones to keep (OTF before TTF before WOFF, then by name and path)."""
    return (FORMAT_RANK.get(f['format'], 9), f['family'].lower(), f['style'].lower(), f['path'], f['index'])


def groups_within(items, small, tol):
    """Connected groups of items (face dicts) whose renders differ by less than tol, each sorted by preference."""
    ordered = sorted(items, key=preference)
    parent = {f['id']: f['id'] for f in ordered}

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b, _ in clone_pairs([small[f['id']] for f in ordered], [f['id'] for f in ordered], tol):
        parent[max(root(a), root(b))] = min(root(a), root(b))           # merge (ids are unique, any order works)
    groups = {}
    for f in ordered:
        groups.setdefault(root(f['id']), []).append(f)
    return list(groups.values())


def drop_clones(live, small, tol):
    """Faces that render like another within tol: the same face in another file (OTF, TTF, WOFF) or a clone under
    another family name (Arimo and Liberation Sans). Keeps the preferred one of each group; where the group's faces
    disagree on weight or slant (Tiresias Infofont's Bold file holds the Regular), no label can be trusted and
    all of them are dropped."""
    for group in groups_within(live, small, tol):
        if len(group) == 1:
            continue
        keep = group[0]
        if len({(f['weight'], f['slant']) for f in group}) > 1:
            for f in group:
                f.update(drop='clone_label_conflict', detail='renders like ' + ', '.join(
                    f"{g['family']} {g['style']} ({g['weight']}, {g['slant']})" for g in group if g is not f))
            continue
        for f in group[1:]:
            same = (key(f['family']), key(f['style'])) == (key(keep['family']), key(keep['style']))
            f.update(drop='duplicate_file' if same else 'pixel_clone',
                     detail=f"{keep['family']} {keep['style']} ({os.path.basename(keep['path'])})")


def drop_same_names(live, small, tol):
    """Faces that claim the same family and style. Copies that differ by less than tol (a different version or
    format of one face) keep the preferred copy; faces that look different mean the names are wrong (Courier
    Prime's four files all say 'Courier Prime Light'), so none of their labels can be trusted."""
    by_name = {}
    for f in live:
        by_name.setdefault((key(f['family']), key(f['style'])), []).append(f)
    for same in by_name.values():
        if len(same) == 1:
            continue
        groups = groups_within(same, small, tol)
        if len(groups) == 1:
            for f in groups[0][1:]:
                f.update(drop='duplicate_file', detail=f"{same[0]['family']} {same[0]['style']} "
                                                       f"({os.path.basename(groups[0][0]['path'])})")
            continue
        for f in same:
            others = ', '.join(os.path.basename(g['path']) for g in same if g is not f)
            f.update(drop='name_conflict', detail=f"named '{f['family']} {f['style']}' like {others}")


def pick_faces(live, n, seed):
    """About n faces for a small build: whole families, those with all four of regular/bold x upright/italic first
    (so that every split sees both values of weight and slant), in a seeded order."""
    fams = {}
    for f in live:
        fams.setdefault(key(f['family']), []).append(f)
    rng = np.random.default_rng(seed)
    names = sorted(fams)
    rng.shuffle(names)
    complete = [k for k in names if len({(f['weight'], f['slant']) for f in fams[k]}) == 4]
    picked = []
    for k in complete + [k for k in names if k not in complete]:
        if len(picked) >= n:
            break
        # one face per weight x slant combination keeps families small and balanced
        seen = {}
        for f in sorted(fams[k], key=preference):
            seen.setdefault((f['weight'], f['slant']), f)
        picked.extend(seen.values())
    return picked

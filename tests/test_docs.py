"""README.md, CHANGELOG.md and docs/*.md cannot rot silently: every relative link and image resolves (its #anchor
too), and every --flag of a command in their code is one the script it runs accepts (read once from its --help)."""
import glob
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(REPO, 'README.md'), os.path.join(REPO, 'CHANGELOG.md'),
         *sorted(glob.glob(os.path.join(REPO, 'docs', '*.md')))]
LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')  # [text](target "title")
SEPARATORS = {'&&', '||', ';', '|', '&'}
PASSES_ON = {'reproduce.py': 'main.py'}  # flags reproduce.py does not know go on to main.py
FLAG_LISTS = {'--repo-flags', '--baseline-flags', '--flags'}  # bench.py's and profile_step.py's main.py flags


def prose(text):
    """The text outside fenced and indented code blocks and outside inline code (links there are not links)."""
    text = re.sub(r'^```.*?^```', '', text, flags=re.S | re.M)
    text = re.sub(r'(?:^|\n\n)(?:(?: {4}|\t).*\n?|\n)+', '\n\n', text)
    return re.sub(r'`[^`\n]*`', '', text)


def code(text):
    """The lines of code: fenced blocks, indented blocks, and inline code spans, with backslash continuations joined."""
    lines = []
    for block in re.findall(r'^```[^\n]*\n(.*?)^```', text, flags=re.S | re.M):
        lines += block.splitlines()
    rest = re.sub(r'^```.*?^```', '', text, flags=re.S | re.M)
    for block in re.findall(r'(?:^|\n\n)((?:(?: {4}|\t).*\n?|\n)+)', rest):
        lines += block.splitlines()
    lines += re.findall(r'`([^`\n]+)`', rest)
    return re.sub(r'\\\n\s*', ' ', '\n'.join(lines)).splitlines()


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped (but - and _), spaces to hyphens."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def anchors(path):
    with open(path, encoding='utf-8') as f:
        text = re.sub(r'^```.*?^```', '', f.read(), flags=re.S | re.M)
    return {slug(h) for h in re.findall(r'^#{1,6}\s+(.*?)\s*#*\s*$', text, flags=re.M)}


def broken_links(page):
    """The relative links and images of one page that point nowhere: 'TARGET (why)'."""
    with open(page, encoding='utf-8') as f:
        text = prose(f.read())
    bad = []
    for target in LINK.findall(text):
        if re.match(r'[a-z][a-z0-9+.-]*:', target, flags=re.I):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition('#')
        full = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(full):
            bad.append(f'{target} (no such file)')
        elif anchor and full.endswith('.md') and anchor not in anchors(full):
            bad.append(f'{target} (no heading with that anchor)')
    return bad


def words(line):
    """A shell line as words, or None where it is not one (Python code with unbalanced quotes)."""
    try:
        return shlex.split(line, comments=True)
    except ValueError:
        return None


def commands(line):
    """(script, [flags...]) of each script run by a shell line: `python X.py ...`, `torchrun ... X.py ...`, and the
    command kept in a variable (`STUDY="python reproduce.py ..."`)."""
    tokens = words(line)
    if not tokens:
        return []
    found, segment = [], []
    for tok in tokens + [';']:
        if tok not in SEPARATORS:
            segment.append(tok)
            continue
        for tok in segment:
            name, eq, value = tok.partition('=')
            if eq and re.fullmatch(r'[A-Za-z_]\w*', name) and ' ' in value:
                found += commands(value)
        runner = [i for i, t in enumerate(segment) if re.search(r'(^|/)(python3?|torchrun)$', t)][:1]
        scripts = [i for i, t in enumerate(segment) if t.endswith('.py') and runner and i > runner[0]]
        if runner and not segment[runner[0]].endswith('torchrun'):  # python X.py (not python -m pytest ... X.py)
            scripts = [i for i in scripts if i == runner[0] + 1]
        if scripts and os.path.isfile(os.path.join(REPO, segment[scripts[0]])):
            i = scripts[0]
            script = os.path.normpath(segment[i])
            flags = []
            for tok in segment[i + 1:]:
                tok = tok.strip('[]')
                name, _, value = tok.partition('=')
                if re.fullmatch(r'--[A-Za-z][\w-]*', name):
                    flags.append(name)
                    if name in FLAG_LISTS and value:
                        found.append(('main.py', [f for f in (words(value) or []) if f.startswith('--')]))
            found.append((script, flags))
        segment = []
    return found


@lru_cache(maxsize=None)
def accepted(script):
    """The option strings a script's --help lists (argparse's option lines: two spaces, then the flags)."""
    p = subprocess.run([sys.executable, os.path.join(REPO, script), '--help'], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, f'{script} --help exited {p.returncode}: {p.stderr[-2000:]}'
    flags = set()
    for line in p.stdout.splitlines():
        m = re.match(r' {2}(-\S.*?)(?: {2,}|$)', line)
        if m:
            flags |= set(re.findall(r'(?<![\w-])--[A-Za-z][\w-]*', m.group(1)))
    assert flags, f'{script} --help lists no flags'
    return frozenset(flags | accepted(PASSES_ON[script]) if script in PASSES_ON else flags)


def unknown_flags(pages):
    """'PAGE: SCRIPT --FLAG' for every flag a page runs that its script does not take."""
    runs = []
    for page in pages:
        with open(page, encoding='utf-8') as f:
            for line in code(f.read()):
                runs += [(page, script, flags) for script, flags in commands(line)]
    scripts = sorted({s for _, s, _ in runs} | {PASSES_ON[s] for _, s, _ in runs if s in PASSES_ON})
    with ThreadPoolExecutor(4) as pool:  # each --help starts Python (and most import torch): once each, side by side
        list(pool.map(accepted, scripts))
    return [f'{os.path.relpath(page, REPO)}: {script} {flag}' for page, script, flags in runs for flag in flags
            if flag not in accepted(script)]


@pytest.mark.parametrize('page', PAGES, ids=lambda p: os.path.relpath(p, REPO))
def test_every_relative_link_and_image_resolves(page):
    assert broken_links(page) == []


@pytest.mark.slow
def test_every_flag_in_the_pages_code_is_one_its_script_accepts():
    assert len(PAGES) > 1
    assert unknown_flags(PAGES) == []


def test_a_broken_link_a_missing_anchor_and_an_image_that_is_not_there_are_found(tmp_path):
    (tmp_path / 'docs').mkdir()
    (tmp_path / 'docs' / 'a.md').write_text('# Use it\n\n## The API: `x.embed()`\n')
    (tmp_path / 'docs' / 'pic.png').write_bytes(b'')
    page = tmp_path / 'README.md'
    page.write_text('See [a](docs/a.md), [the API](docs/a.md#the-api-xembed) and ![pic](docs/pic.png).\n'
                    'But [b](docs/b.md), [gone](docs/a.md#nowhere), [self](#no-such) and ![x](docs/x.png);\n'
                    '[a web page](https://example.org/x.md) is not checked, nor `[code](nowhere.md)`.\n\n'
                    '    [in a code block](nowhere.md)\n')
    assert broken_links(str(page)) == ['docs/b.md (no such file)', 'docs/a.md#nowhere (no heading with that anchor)',
                                       '#no-such (no heading with that anchor)', 'docs/x.png (no such file)']


def test_commands_are_read_from_code_blocks_variables_flag_lists_and_inline_code():
    page = ('Train:\n\n'
            '    python main.py --data d --lr 3e-3 && .venv/bin/python main.py --test --resume r  # --not-this\n'
            '    torchrun --nproc_per_node 4 main.py --name x \\\n        --batch-size 256\n'
            '    STUDY="python reproduce.py --budgets 600 --image-size 32"\n'
            '    python bench.py --repo-flags="--no-pretrained --threads 1"\n'
            '    python -m visdom.server -port 8097\n    .venv/bin/python -m pytest -m gpu -v tests/test_gpu.py\n\n'
            'Then `python retrieve.py --k 8` or [main.py flags...] `--alone`.\n\n'
            '```\npython get_data.py [--max-faces 120] --dataset=fonts\n```\n')
    runs = [c for line in code(page) for c in commands(line)]
    assert sorted(runs) == sorted([
        ('main.py', ['--data', '--lr']), ('main.py', ['--test', '--resume']), ('main.py', ['--name', '--batch-size']),
        ('reproduce.py', ['--budgets', '--image-size']), ('main.py', ['--no-pretrained', '--threads']),
        ('bench.py', ['--repo-flags']), ('retrieve.py', ['--k']), ('get_data.py', ['--max-faces', '--dataset'])])


@pytest.mark.slow
def test_an_unknown_flag_is_found_and_reproduce_py_takes_main_py_s(tmp_path):
    page = tmp_path / 'page.md'
    page.write_text('    python main.py --data d --no-such-flag\n'
                    '    python reproduce.py --data d --budgets 600 --image-size 32 --not-main-either\n'
                    '    python bench.py --baseline-flags="--amp off --nor-this"\n')
    where = os.path.relpath(page, REPO)
    assert unknown_flags([str(page)]) == [f'{where}: {f}' for f in ('main.py --no-such-flag',
                                                                   'reproduce.py --not-main-either',
                                                                   'main.py --nor-this')]

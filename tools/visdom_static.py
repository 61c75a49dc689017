"""Install visdom 0.2.4's browser files (js, css, fonts, MathJax) from npm packages, so its server starts offline.

At every start `python -m visdom.server` downloads these files from CDNs (unpkg, cdn.plot.ly, d3js.org, cdnjs), and
without internet it crashes (MathJax is fetched with `requests`). It skips the download when `static/version.built`
holds visdom's version and every file exists. This script puts the same files there from the npm packages they come
from, then writes `version.built`.

    python tools/visdom_static.py                    # npm pack the packages (needs npm and the npm registry), install
    python tools/visdom_static.py --download DIR     # only fetch the package tarballs into DIR, to carry
                                                     # to another machine
    python tools/visdom_static.py --from DIR         # install offline from tarballs in DIR (or a
                                                     # .tar/.tar.gz bundle of them)
    python tools/visdom_static.py --check            # exit 1 if anything is missing
"""
import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: csnlib
from csnlib.errors import UserError, run_script  # noqa: E402

# npm package -> (sha1 of the tarball as the registry publishes it, [(path inside the package, path under static/)]).
# The destinations are those of visdom 0.2.4's visdom/server/build.py (tests/test_loggers.py checks that build.py then
# downloads nothing).
MJ = 'js/mathjax/2.7.5/'
GLYPH = 'glyphicons-halflings-regular'
PACKAGES = {
    'jquery@3.1.1': ('347c1c21c7e004115e0a4da32cece041fad3c8a3', [('dist/jquery.min.js', 'js/jquery.min.js')]),
    'bootstrap@3.3.7': ('5a389394549f23330875a3b150656574f8a9eb71', [
        ('dist/js/bootstrap.min.js', 'js/bootstrap.min.js'),
        ('dist/css/bootstrap.min.css', 'css/bootstrap.min.css'),
        *[(f'dist/fonts/{GLYPH}.{ext}', f'fonts/{GLYPH}.{ext}') for ext in ('eot', 'woff2', 'woff', 'ttf', 'svg')],
        # build.py saves the svg under its URL, fragment included; browsers ask for the plain name
        (f'dist/fonts/{GLYPH}.svg', f'fonts/{GLYPH}.svg#glyphicons_halflingsregular'),
    ]),
    'react@16.2.0': ('a31bd2dab89bff65d42134fa187f24d054c273ba',
                     [('umd/react.production.min.js', 'js/react-react.min.js')]),
    'react-dom@16.2.0': ('69003178601c0ca19b709b33a83369fe6124c044',
                         [('umd/react-dom.production.min.js', 'js/react-dom.min.js')]),
    'react-modal@3.1.10': ('8898b5cc4ebba78adbb8dea4c55a69818aa682cc',
                           [('dist/react-modal.min.js', 'js/react-modal.min.js')]),
    'plotly.js-dist-min@2.11.1': ('9e05a2d8df8c5cc63555a6acf1f7e18e39fa5fea',
                                  [('plotly.min.js', 'js/plotly-plotly.min.js')]),
    'sjcl@1.0.7': ('32b365a50dc9bba26b88ba3c9df8ea34217d9f45', [('sjcl.js', 'js/sjcl.js')]),
    'layout-bin-packer@1.4.0': ('4115a8e0089ee2a3ff53386ca70fdc16e8b95e07', [
        ('dist/layout-bin-packer.js', 'js/layout_bin_packer.js'),
        ('dist/layout-bin-packer.js.map', 'js/layout-bin-packer.js.map'),
    ]),
    'd3@3.5.17': ('bc46748004378b21a360c9fc7cf5231790762fb8', [('d3.min.js', 'js/d3.v3.min.js')]),
    'd3-selection-multi@1.0.1': ('cd6c25413d04a2cb97470e786f2cd877f3e34f58',
                                 [('build/d3-selection-multi.js', 'js/d3-selection-multi.v1.js')]),
    'save-svg-as-png@1.4.17': ('294442002772a24f1db1bf8a2aaf7df4ab0cdc55',
                               [('lib/saveSvgAsPng.js', 'js/saveSvgAsPng.js')]),
    'react-resizable@1.4.6': ('2cdc2186606f3a564444ecd4cfea7f400301a3ea',
                              [('css/styles.css', 'css/react-resizable-styles.css')]),
    'react-grid-layout@0.16.3': ('b669eb0b036a68d2413162bcea68cde405d223fd',
                                 [('css/styles.css', 'css/react-grid-layout-styles.css')]),
    'classnames@2.2.5': ('fb3801d453467649ef3603c7d61a02bd129bde6d', [('index.js', 'fonts/classnames')]),
    'mathjax@2.7.5': ('c9c5947f86f9be31651f5f3667d3c9a8bb01efe4', [(p, MJ + p) for p in (
        'MathJax.js', 'config/Safe.js', 'config/TeX-AMS-MML_HTMLorMML.js', 'extensions/Safe.js',
        'jax/output/SVG/config.js', 'jax/output/SVG/jax.js', 'jax/output/SVG/fonts/TeX/fontdata.js',
        'jax/output/SVG/fonts/TeX/Size1/Regular/Main.js')]),
}
VISDOM_VERSION = '0.2.4'  # the release whose build.py the table above copies


def tarball_name(spec):
    """'plotly.js-dist-min@2.11.1' -> 'plotly.js-dist-min-2.11.1.tgz', the name `npm pack` gives it."""
    name, version = spec.rsplit('@', 1)
    return f'{name}-{version}.tgz'


def visdom_dir():
    """The installed visdom package's folder, found without importing visdom."""
    spec = importlib.util.find_spec('visdom')
    if spec is None or spec.origin is None:
        raise UserError('visdom is not installed; run `bash setup.sh` (or pip install visdom==0.2.4) first')
    return os.path.dirname(spec.origin)


def visdom_version(vdir):
    with open(os.path.join(vdir, 'VERSION')) as f:
        return f.read().strip()


def missing_files(static_dir, version):
    """The files under static_dir that visdom's server would try to download, plus version.built if stale."""
    missing = [dest for _, files in PACKAGES.values() for _, dest in files
               if not os.path.isfile(os.path.join(static_dir, dest))]
    built = os.path.join(static_dir, 'version.built')
    if not os.path.isfile(built) or open(built).read().strip() != version:
        missing.append('version.built')
    return missing


def npm_pack(dest_dir):
    """Fetch every package tarball into dest_dir with `npm pack` (which checks the registry's integrity hash)."""
    if shutil.which('npm') is None:
        raise UserError('npm is not installed. Install it (apt-get install npm), or fetch the tarballs on a machine '
                        'that has it (python tools/visdom_static.py --download DIR) and pass that folder '
                        'with --from DIR')
    os.makedirs(dest_dir, exist_ok=True)
    cmd = ['npm', 'pack', '--silent', '--pack-destination', dest_dir, *PACKAGES]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise UserError(f"`{' '.join(cmd)}` failed (exit {r.returncode}):\n{r.stderr.strip()}\n"
                 "Is the npm registry reachable? Offline, fetch the tarballs elsewhere with --download DIR and "
                 "install with --from DIR")


def find_tarballs(source, work_dir):
    """{spec: path} for every package tarball in a folder (searched recursively) or in a .tar/.tar.gz bundle."""
    if os.path.isfile(source):
        with tarfile.open(source) as bundle:
            members = [m for m in bundle.getmembers() if m.isfile() and m.name.endswith('.tgz')]
            for m in members:  # flattened: only the base name is used
                with open(os.path.join(work_dir, os.path.basename(m.name)), 'wb') as f:
                    f.write(bundle.extractfile(m).read())
        source = work_dir
    found = {}
    for root, _, names in os.walk(source):
        for name in names:
            found.setdefault(name, os.path.join(root, name))
    wanted = {spec: tarball_name(spec) for spec in PACKAGES}
    lacking = [name for name in wanted.values() if name not in found]
    if lacking:
        raise UserError(f"--from {source} lacks {', '.join(lacking)}. Fetch them with "
                 f"`python tools/visdom_static.py --download DIR` (or `npm pack {' '.join(PACKAGES)}`)")
    return {spec: found[name] for spec, name in wanted.items()}


def install(tarballs, static_dir, version):
    """Copy each file out of its package tarball into static_dir, then mark the build done for this visdom version."""
    for spec, (sha1, files) in PACKAGES.items():
        path = tarballs[spec]
        with open(path, 'rb') as f:
            digest = hashlib.sha1(f.read()).hexdigest()
        if digest != sha1:
            raise UserError(f"{path} has sha1 {digest}, expected {sha1} (the registry's) for {spec}; "
                     "fetch it again")
        with tarfile.open(path) as tgz:
            for src, dest in files:
                data = tgz.extractfile(f'package/{src}').read()
                out = os.path.join(static_dir, dest)
                os.makedirs(os.path.dirname(out), exist_ok=True)
                with open(out + '.tmp', 'wb') as f:
                    f.write(data)
                os.replace(out + '.tmp', out)
    with open(os.path.join(static_dir, 'version.built'), 'w') as f:  # last, so a half install is not taken as done
        f.write(version)


def main(argv=None):
    p = argparse.ArgumentParser(description="Install visdom's browser files from npm packages, so that "
                                            "`python -m visdom.server` starts without internet.",
                                allow_abbrev=False)
    p.add_argument('--from', dest='source', default=None, metavar='PATH',
                   help='folder (or .tar/.tar.gz bundle) holding the npm package tarballs; no network used '
                        '(default: fetch them with npm pack)')
    p.add_argument('--download', default=None, metavar='DIR',
                   help='only fetch the package tarballs into DIR with npm pack, install nothing (default: off)')
    p.add_argument('--static-dir', default=None,
                   help="where to install (default: the installed visdom package's static/ folder)")
    p.add_argument('--check', action='store_true', help='only report what is missing; exit 1 if anything is '
                                                        '(default: off)')
    p.add_argument('--force', action='store_true', help='install even if everything is there (default: off)')
    args = p.parse_args(argv)

    if args.download:
        npm_pack(args.download)
        print(f'visdom_static.py: {len(PACKAGES)} package tarballs in {args.download}; on the offline machine run '
              f'python tools/visdom_static.py --from {args.download}')
        return
    if args.source and not os.path.exists(args.source):
        raise UserError(f'--from {args.source}: no such file or folder')
    vdir = visdom_dir()
    version = visdom_version(vdir)
    if version != VISDOM_VERSION:
        print(f'visdom_static.py: warning: visdom {version} is installed; these files are those of visdom '
              f'{VISDOM_VERSION} (pin visdom=={VISDOM_VERSION} as requirements.txt does)', file=sys.stderr)
    static_dir = args.static_dir or os.path.join(vdir, 'static')
    missing = missing_files(static_dir, version)
    if args.check:
        print(f'visdom_static.py: {static_dir}: ' + (f"missing {', '.join(missing)}" if missing else 'complete'))
        return 1 if missing else 0
    if not missing and not args.force:
        print(f"visdom_static.py: visdom's browser files are already in {static_dir}")
        return
    with tempfile.TemporaryDirectory() as work:
        if args.source:
            tarballs = find_tarballs(args.source, work)
        else:
            npm_pack(work)
            tarballs = {spec: os.path.join(work, tarball_name(spec)) for spec in PACKAGES}
        install(tarballs, static_dir, version)
    n = sum(len(files) for _, files in PACKAGES.values())
    print(f'visdom_static.py: installed {n} files from {len(PACKAGES)} npm packages into {static_dir}; '
          '`python -m visdom.server` now starts offline')


if __name__ == '__main__':
    sys.exit(run_script(main))

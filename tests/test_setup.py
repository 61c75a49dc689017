"""setup.sh's choice of environment (--print-env): the active venv, else conda's, else .venv/, and .venv/bin/python
always runs the chosen one. Each test runs a copy of setup.sh in tmp_path, so the checkout's own .venv plays no part."""
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def repo(tmp_path):
    d = tmp_path.resolve() / 'repo'  # setup.sh reports physical paths
    d.mkdir()
    shutil.copy(os.path.join(REPO, 'setup.sh'), d)
    return d


def fake_env(path):
    """A directory that looks like an environment to setup.sh: bin/python runs this Python, which has pip."""
    (path / 'bin').mkdir(parents=True)
    (path / 'bin' / 'python').write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (path / 'bin' / 'python').chmod(0o755)
    return path


def run_setup(repo, *args, **env_vars):
    env = {k: v for k, v in os.environ.items() if k not in ('VIRTUAL_ENV', 'CONDA_PREFIX')}
    env.update({k: str(v) for k, v in env_vars.items()})
    return subprocess.run(['bash', str(repo / 'setup.sh'), *args], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=60)


def print_env(repo, **env_vars):
    p = run_setup(repo, '--print-env', **env_vars)
    assert p.returncode == 0, p.stderr
    return dict(line.split('=', 1) for line in p.stdout.splitlines())


def test_no_active_env_makes_dotvenv(repo):
    assert print_env(repo) == {'env': str(repo / '.venv'), 'kind': 'venv', 'python': str(repo / '.venv/bin/python'),
                               'dotvenv': 'create'}
    assert sorted(os.listdir(repo)) == ['setup.sh']  # --print-env changes nothing


def test_existing_dotvenv_is_kept_once_it_has_pip(repo):
    venv = repo / '.venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
    out = print_env(repo)  # half made (python3-venv was missing): setup.sh runs python3 -m venv again to add pip
    assert out == {'env': str(venv), 'kind': 'venv', 'python': str(venv / 'bin/python'), 'dotvenv': 'create'}
    shutil.rmtree(venv)
    fake_env(venv)
    assert print_env(repo)['dotvenv'] == 'keep'


@pytest.mark.parametrize('var', ['VIRTUAL_ENV', 'CONDA_PREFIX'])
def test_active_env_is_used_and_dotvenv_links_to_it(repo, var):
    env = fake_env(repo.parent / 'active')
    out = print_env(repo, **{var: env})
    assert out == {'env': str(env), 'kind': 'virtualenv' if var == 'VIRTUAL_ENV' else 'conda',
                   'python': str(env / 'bin/python'), 'dotvenv': 'link'}
    os.symlink(env, repo / '.venv')  # what a real run leaves: then nothing to do
    assert print_env(repo, **{var: env})['dotvenv'] == 'keep'


def test_dotvenv_link_runs_the_linked_venv(repo):
    """As docs/install.md says: through the link, .venv/bin/python is the active venv (its pyvenv.cfg, packages)."""
    env = repo.parent / 'active'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(env)], check=True)
    os.symlink(env, repo / '.venv')
    code = 'import sys, sysconfig; print(sys.prefix != sys.base_prefix, sysconfig.get_path("purelib"))'
    p = subprocess.run([str(repo / '.venv/bin/python'), '-c', code], capture_output=True, text=True, check=True)
    in_venv, purelib = p.stdout.split()
    assert in_venv == 'True'
    assert os.path.realpath(purelib).startswith(str(env) + os.sep)


def test_virtual_env_wins_over_conda(repo):
    venv, conda = fake_env(repo.parent / 'venv'), fake_env(repo.parent / 'conda')
    out = print_env(repo, VIRTUAL_ENV=venv, CONDA_PREFIX=conda)
    assert (out['env'], out['kind']) == (str(venv), 'virtualenv')


def test_dotvenv_activated_is_the_same_env(repo):
    venv = fake_env(repo / '.venv')
    assert print_env(repo, VIRTUAL_ENV=venv) == {'env': str(venv), 'kind': 'virtualenv',
                                                 'python': str(venv / 'bin/python'), 'dotvenv': 'keep'}


def test_link_left_by_an_earlier_run_is_followed_when_nothing_is_active(repo):
    env = fake_env(repo.parent / 'active')
    os.symlink(env, repo / '.venv')
    assert print_env(repo)['env'] == str(env)
    shutil.rmtree(env)  # the linked environment is gone: a new .venv/ instead
    out = print_env(repo)
    assert (out['env'], out['dotvenv']) == (str(repo / '.venv'), 'create')


def test_active_env_and_another_dotvenv_is_an_error(repo):
    fake_env(repo / '.venv')
    env = fake_env(repo.parent / 'active')
    p = run_setup(repo, '--print-env', VIRTUAL_ENV=env)
    assert p.returncode == 2 and p.stdout == ''
    assert f'VIRTUAL_ENV={env} is active but .venv/ here is another environment' in p.stderr
    assert 'rm -r .venv' in p.stderr


def test_active_env_without_python_is_an_error(repo):
    p = run_setup(repo, '--print-env', CONDA_PREFIX=repo.parent / 'gone')
    assert p.returncode == 2
    assert f'CONDA_PREFIX={repo.parent / "gone"} is set but' in p.stderr and 'bin/python does not exist' in p.stderr


def test_unknown_option(repo):
    p = run_setup(repo, '--no-such-option')
    assert p.returncode == 2 and 'unknown option --no-such-option' in p.stderr
    assert sorted(os.listdir(repo)) == ['setup.sh']


def test_requirements_are_split():
    """Running needs only requirements.txt; requirements-dev.txt adds the test and lint tools on top of it."""
    def names(path):
        with open(os.path.join(REPO, path)) as f:
            lines = [line.split('#')[0].strip() for line in f]
        return {line.split('=')[0].split('<')[0].split('>')[0].strip() for line in lines if line}
    run, dev = names('requirements.txt'), names('requirements-dev.txt')
    assert {'torch', 'torchvision', 'visdom', 'tornado', 'numpy'} <= run
    dev_only = {'pytest', 'playwright', 'ruff', 'onnx', 'onnxruntime', 'nvidia-ml-py', 'faiss-cpu', 'gradio',
                'pytorch-metric-learning', 'lancedb'}
    assert not run & dev_only
    assert dev == {'-r requirements.txt'} | dev_only

"""csnlib/stopping.py: the plateau rule against a validation curve walked epoch by epoch."""
import pytest

from csnlib.stopping import REASONS, explain, plateaued, stop_reason


def walk(curve, patience, cap):
    """Train on `curve` (validation accuracy per epoch) as main.py does: (epochs trained, best epoch, reason)."""
    best, best_epoch = 0.0, 0
    for epoch in range(1, cap + 1):
        acc = curve[epoch - 1]
        if acc > best:
            best, best_epoch = acc, epoch
        reason = stop_reason(epoch, best_epoch, patience, cap)
        if reason:
            return epoch, best_epoch, reason
    raise AssertionError('never stopped')


def slow_plateau(curve, patience, cap):
    """The rule written out: stop at the first epoch whose last `patience` epochs were all no better than before."""
    for e in range(1, cap + 1):
        if patience and e >= patience and max(curve[e - patience:e]) <= max(curve[:e - patience], default=0.0):
            return e, 'plateau'
        if e == cap:
            return e, 'cap'


@pytest.mark.parametrize('patience', [1, 2, 3])
def test_the_rule_stops_where_the_written_out_rule_does(patience):
    curves = [[0.5, 0.6, 0.7, 0.7, 0.65, 0.71, 0.7, 0.69, 0.6, 0.6],
              [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
              [0.1 * e for e in range(1, 11)],                       # still improving at the cap
              [0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.95]]
    for curve in curves:
        epochs, best_epoch, reason = walk(curve, patience, 10)
        assert (epochs, reason) == slow_plateau(curve, patience, 10), (curve, patience)
        assert curve[best_epoch - 1] == max(curve[:epochs])


def test_edge_cases():
    assert walk([0.1 * e for e in range(1, 11)], 2, 10) == (10, 10, 'cap')
    assert walk([0.5] * 10, 2, 10) == (3, 1, 'plateau')              # a tie is no improvement
    assert walk([0.5, 0.6, 0.4], 2, 3) == (3, 2, 'cap')              # one epoch short of the patience at the cap
    assert walk([0.5, 0.6, 0.4, 0.3], 2, 4) == (4, 2, 'plateau')     # a plateau reached at the cap is a plateau
    assert not plateaued(0, 0, 1)                                    # nothing trained yet
    assert not any(plateaued(e, 0, 0) for e in range(100))           # patience 0: off
    assert stop_reason(5, 1, 0, 200) is None and stop_reason(200, 1, 0, 200) == 'cap'
    assert plateaued(7, 4, 3) and not plateaued(6, 4, 3)             # a resumed run that had stopped stops again


def test_explain_names_each_reason():
    assert 'plateau' in explain('plateau', 4, 3, 20) and 'after epoch 4' in explain('plateau', 4, 3, 20)
    assert explain('cap', 4, 3, 20).startswith('stopped: cap (--epochs 20')
    assert explain('interrupted', 4, 3, 20) == 'stopped: interrupted'
    assert set(REASONS) == {'plateau', 'cap', 'interrupted', 'seen'}


@pytest.mark.slow
def test_main_stops_at_the_plateau_and_says_why(shapes_data, tmp_path):
    """main.py --patience 1 with a learning rate too small to move anything: the best epoch is the first, so training
    stops after the second; metrics.jsonl, the checkpoint and the last line say why. Resumed, it trains nothing."""
    import json

    import torch

    from conftest import FAST, run_main
    flags = ['--data', shapes_data, '--runs', tmp_path, '--name', 'p', *FAST, '--num_traintriplets', '64',
             '--no-pictures', '--epochs', '5', '--patience', '1']
    p = run_main(*flags, '--lr', '1e-12')
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith('done: ') and 'stopped: plateau' in last and 'after epoch 1' in last, last
    lines = [json.loads(x) for x in (tmp_path / 'p' / 'metrics.jsonl').read_text().splitlines()]
    assert [m['epoch'] for m in lines] == [1, 2] and lines[-1]['stopped'] == 'plateau' and 'stopped' not in lines[0]
    ck = torch.load(tmp_path / 'p' / 'checkpoint.pth.tar', weights_only=True)
    assert ck['stopped'] == 'plateau' and ck['best_epoch'] == 1 and ck['next_epoch'] == 3
    p = run_main('--resume', tmp_path / 'p' / 'checkpoint.pth.tar', '--data', shapes_data)
    assert 'epoch   3' not in p.stdout and 'stopped: plateau' in p.stdout.strip().splitlines()[-1]
    p = run_main(*flags[:5], 'q', *flags[6:-4], '--epochs', '2')           # no --patience: the cap, as before
    assert 'stopped: cap (--epochs 2)' in p.stdout.strip().splitlines()[-1]
    assert json.loads((tmp_path / 'q' / 'metrics.jsonl').read_text().splitlines()[-1])['stopped'] == 'cap'

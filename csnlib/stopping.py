"""When training stops: at a plateau of the validation accuracy (--patience), at the epoch cap (--epochs), or when
interrupted; reproduce.py --seen caps every run at the same compute ('seen'). Pure functions of the epoch counters."""

REASONS = ('plateau', 'cap', 'interrupted', 'seen')


def plateaued(epoch, best_epoch, patience):
    """After epoch `epoch`: has the validation accuracy not improved for `patience` epochs? (patience 0: never)"""
    return patience > 0 and epoch - best_epoch >= patience


def stop_reason(epoch, best_epoch, patience, cap):
    """Why training stops after epoch `epoch`: 'plateau', 'cap', or None to train on. A plateau reached at the cap is
    a plateau: the run had converged."""
    if plateaued(epoch, best_epoch, patience):
        return 'plateau'
    return 'cap' if epoch >= cap else None


def explain(reason, best_epoch, patience, cap):
    """The stop reason in words, for main.py's last line."""
    if reason == 'plateau':
        return f'stopped: plateau (no better validation accuracy in the {patience} epochs after epoch {best_epoch})'
    if reason == 'cap':
        more = f', still improving within --patience {patience}' if patience else ''
        return f'stopped: cap (--epochs {cap}{more})'
    return f'stopped: {reason}'

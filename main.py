"""Train and evaluate Conditional Similarity Networks (Veit, Belongie, Karaletsos, CVPR 2017) and the paper's baselines.

    python main.py --data data --name csn_learned --learned --num_traintriplets 200000
    python main.py --test --resume runs/csn_learned/model_best.pth.tar
    torchrun --nproc_per_node 4 main.py ...      (DistributedDataParallel; see the README)
"""
import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from csnlib import add_notion, conv_wgrad, options, runtime
from csnlib.asen_data import protocol_results
from csnlib.atomic import atomic_open, open_append
from csnlib.builder import build_model, place
from csnlib.checkpoint import (
    describe,
    how_to_run_changes,
    load_checkpoint,
    merge_checkpoint_args,
    save_checkpoint,
    trained_conditions,
)
from csnlib.errors import CheckpointError, UserError, run_script
from csnlib.evaluate import embed_dataset, embed_images, evaluate
from csnlib.image_cache import make_store
from csnlib.loggers import Logger, make_logger
from csnlib.options import explicit_flags
from csnlib.pictures import write_pictures
from csnlib.pml_metrics import INSTALL, notion_accuracies, pml_or_none
from csnlib.run_lock import RunLock
from csnlib.search import export_embeddings, retrieval_map
from csnlib.stopping import explain, plateaued, stop_reason
from csnlib.train_loop import NonFiniteLoss, make_optimizer, train_epoch
from triplet_image_loader import (
    DataError,
    check_triplet_file,
    choose_hflip,
    format_problems,
    load_dataset_info,
    load_image,
    load_triplets,
    parse_conditions,
    read_labels,
)


def main(argv=None):
    """main.py's command line: the exit status. User errors are raised (UserError) and printed by run_script as one
    line with status 2; what only training can meet has a status of its own (3: a non-finite loss, 4: a lost peer)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = options.main_parser()
    args = parser.parse_args(argv)
    try:
        return run(args, explicit_flags(parser, argv))
    except KeyboardInterrupt:
        print('interrupted; the last checkpoint is kept', file=sys.stderr)
        return 130
    except NonFiniteLoss as e:
        print(f'error: {e}. Training stopped; the last good checkpoint is kept. Try a lower --lr or --amp off.',
              file=sys.stderr)
        return 3
    except RuntimeError as e:
        if not (dist.is_initialized() and runtime.lost_peer(e)):
            raise
        print(f'error: rank {dist.get_rank()}: lost contact with the other processes '
              f'({str(e).strip().splitlines()[-1][:200]}): '
              f'one of them died or hung for longer than --dist-timeout {args.dist_timeout:g} s. The job stops; the '
              f'last checkpoint is kept, continue with --resume '
              f'{os.path.join(args.runs, args.name, "checkpoint.pth.tar")}',
              file=sys.stderr)
        if dist.get_backend() == 'nccl':  # tearing NCCL down waits for the collective that never ends: leave at once
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(4)
        return 4
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass(frozen=True)
class Plan:
    """What one call of main.py works on, resolved from the command line, the checkpoint and the dataset before
    anything starts (no process group, no device, no file written)."""
    args: argparse.Namespace  # the final args: the command line merged with the checkpoint's run
    ckpt: dict                # the checkpoint resumed or tested (None: a new run)
    resume: str               # its path ('' = none)
    info: object              # the dataset (with --add-notion: its notions plus the new one)
    conditions: list          # the notions trained or tested, as indices
    new: int = None           # --add-notion: the notion taught
    fresh: bool = False       # --add-notion: a new run from a trained model (else the teaching run goes on)
    notes: tuple = ()         # lines to print once the runtime knows which process prints


def run(args, explicit):
    plan = resolve(args, explicit)
    rt = runtime.start(plan.args, plan.resume)
    for note in plan.notes:
        rt.log(note)
    if plan.args.check_data:
        return check_data(plan.info, plan.conditions) if rt.is_main else 0
    malloc = runtime.keep_freed_memory(plan.args, rt.device)
    args, ckpt, resume, info, conditions = plan.args, plan.ckpt, plan.resume, plan.info, plan.conditions
    hflip = choose_hflip(args, info)
    flip_note = '' if args.test else f', hflip {"on" if hflip[0] else "off"} ({hflip[1]})'
    amp = rt.amp_dtype and str(rt.amp_dtype).replace('torch.', '') or 'off'
    wgrad_dtypes = () if args.test else conv_wgrad.dtypes_for(args.conv_wgrad, rt.device)
    wgrad_note = rt.device.type == 'cpu' and not args.test
    rt.log(f'device {rt.device}{f" x{rt.world} processes" if rt.world > 1 else ""}, amp {amp}'
           f'{runtime.amp_note(rt.amp_dtype, rt.device)}'
           f'{" + grad scaler" if rt.use_scaler else ""}, channels_last {args.channels_last}, compile {args.compile}, '
           f'image cache {"on" if args.cache else "off"}, workers {rt.workers}'
           f'{f" ({rt.workers_note})" if rt.workers_note else ""}, embedding batch {rt.eval_batch_size}'
           f'{f", malloc {malloc}" if rt.device.type == "cpu" else ""}'
           f'{f", threads {rt.threads}" if rt.device.type == "cpu" else ""}'
           f'{f", conv weight gradients {conv_wgrad.describe(wgrad_dtypes)}" if wgrad_note else ""}'
           f'{flip_note}')
    model = build_model(args, len(info.notions), pretrained=not args.no_pretrained and ckpt is None)
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt['state_dict'])
        except RuntimeError as e:
            raise UserError(f'--resume {resume}: does not match a {describe(args)} model: '
                            f'{str(e).splitlines()[0]}') from None
    place(model, args, rt.device, wgrad_dtypes)
    if plan.new is not None:
        add_notion.freeze(model, plan.new)

    out_dir = run_dir_for(args)
    if args.test and 'name' not in explicit:
        out_dir = os.path.dirname(os.path.abspath(resume))
    if args.test:
        with RunLock(out_dir, 'tests a model into') if rt.is_main else nullcontext():
            return test(model, ckpt, info, conditions, rt, out_dir)
    return train(model, None if plan.fresh else ckpt, info, conditions, rt, hflip[0], plan.new)


def resolve(args, explicit):
    """The Plan of this call: flags checked together, --resume auto found, the checkpoint read and its run's flags
    merged, the dataset read, --add-notion prepared, the notions chosen."""
    if args.learned and args.prein:
        raise UserError('--learned and --prein are two different mask starts: pass one of them')
    if (args.learned or args.prein) and args.model != 'csn':
        raise UserError(f'--learned/--prein are CSN mask options; --model {args.model} has no masks')
    if args.test and 'add_notion' in explicit:
        raise UserError('--add-notion trains and --test evaluates: teach the notion first, then --test the new run')
    ckpt, resume, notes = None, args.resume, []
    if args.resume == 'auto':
        found = os.path.join(run_dir_for(args), 'model_best.pth.tar' if args.test else 'checkpoint.pth.tar')
        if not os.path.exists(found) and args.test:
            raise UserError(f'--test --resume auto: there is no {found} (train the run --name {args.name} first, or '
                            f'give --resume PATH)')
        resume = found if os.path.exists(found) else ''
        if not resume:
            notes.append(f'--resume auto: no {found} yet, starting the run')
    if resume:
        ckpt = load_checkpoint(resume)
        args = merge_checkpoint_args(args, ckpt, explicit, resume)
        changed = how_to_run_changes(args, ckpt, explicit)
        if changed:
            notes.append(f'note: how to run is this machine\'s choice, not the checkpoint\'s: {", ".join(changed)} '
                         f'(give the flag to keep the checkpoint\'s)')
        # where a run writes is this command line's business, never the checkpoint's: a resumed run goes on in the
        # folder of the checkpoint it was given (a run tested writes its results there; --add-notion's new run goes
        # next to it as NAME+NOTION), unless --runs or --name say otherwise
        runs, name = os.path.split(os.path.dirname(os.path.abspath(resume)))
        args = argparse.Namespace(**{**vars(args), **({} if 'runs' in explicit else {'runs': runs}),
                                     **({} if 'name' in explicit else {'name': name})})
    elif args.test:
        raise UserError('--test needs --resume CHECKPOINT (e.g. runs/NAME/model_best.pth.tar)')

    info = load_dataset_info(args.data)
    new, fresh = None, False
    if args.add_notion and not args.test:
        args, ckpt, info, new, fresh = add_notion.prepare(args, ckpt, info, explicit, resume)
    conditions = parse_conditions(args.conditions, info.notions)
    if ckpt is not None and ckpt.get('notions') and ckpt['notions'] != info.notions:
        raise UserError(f'--resume {resume}: the checkpoint was trained on notions {ckpt["notions"]}, but '
                        f'{args.data} has {info.notions}')
    if ckpt is None and not args.test and args.no_pretrained and args.lr == options.FINE_TUNING_LR:
        notes.append(lr_note(args.lr))
    if args.test and ckpt is not None:
        conditions = notions_to_test(ckpt, conditions, info.notions, resume, notes.append)
        args = argparse.Namespace(**{**vars(args), 'conditions': [info.notions[c] for c in conditions]})
    return Plan(args, ckpt, resume, info, conditions, new, fresh, tuple(notes))


def lr_note(lr):
    """The line said when a run from random weights keeps the rate meant for fine-tuning ImageNet weights."""
    return (f'note: --lr {lr:g} is the paper\'s rate for fine-tuning ImageNet weights; from random weights '
            f'(--no-pretrained) the Fonts study trained best at --lr {options.SCRATCH_LR:g} (docs/study.md)')


def notions_to_test(ckpt, conditions, notions, resume, log):
    """The notions --test evaluates: those asked for that the checkpoint trained (a mask or network that was never
    trained answers with noise). Says which were left out; refuses when none is left."""
    trained = trained_conditions(ckpt, notions)
    kept = [c for c in conditions if c in trained]
    dropped = [notions[c] for c in conditions if c not in trained]
    if not kept:
        raise UserError(f'--test: {resume} was trained on {[notions[c] for c in trained]} only, not on {dropped}: '
                        f'an untrained notion cannot be evaluated; leave out --conditions or choose trained notions')
    if dropped:
        log(f'note: {resume} was trained on {[notions[c] for c in trained]} only; '
            f'--test evaluates those, not {dropped}')
    elif len(trained) < len(notions):
        log(f'note: {resume} was trained on {[notions[c] for c in trained]} of the dataset\'s {list(notions)}; '
            f'--test evaluates those only')
    return kept


def run_dir_for(args):
    return os.path.join(args.runs, args.name)


def check_data(info, conditions):
    """--check-data: every problem in the triplet files and images, with file and line; exit status 1 if any."""
    problems, used = [], set()
    for c in conditions:
        for split in ('train', 'val', 'test'):
            path = info.triplet_file(info.notions[c], split)
            if not os.path.exists(path):
                problems.append((path, 0, 'file not found'))
                continue
            t, _, bad = check_triplet_file(path, len(info.filenames))
            problems += bad
            used.update(np.unique(t).tolist())
            print(f'{path}: {len(t)} good triplets, {len(bad)} bad lines')
    names = os.path.join(info.root, 'filenames.json')
    for i in sorted(set(range(len(info.filenames))) - used):  # lines no triplet uses: their paths must stay inside too
        try:
            info.image_path(i)
        except DataError as e:
            problems.append((names, i + 1, str(e)))
    for i in tqdm(sorted(used), desc='reading images', leave=False, disable=None):
        try:
            load_image(info.image_path(i), 8)
        except DataError as e:
            problems.append((names, i + 1, str(e)))
    if problems:
        print(format_problems(problems, limit=len(problems)))
    print(f'{len(problems)} problem(s) found in {info.root} ({len(used)} images checked)')
    return 1 if problems else 0


def test(model, ckpt, info, conditions, rt, out_dir):
    """--test: accuracy on the test split, retrieval mAP, pictures, test_results.json in out_dir."""
    args, log = rt.args, rt.log
    trip, cond = load_triplets(info, 'test', conditions, args.num_testtriplets, args.seed, args.skip_bad_triplets, log)
    store = make_store(info, rt)
    t0 = time.time()
    embedded = {}
    res = evaluate(model, trip, cond, store, rt, info.notions, embeddings=embedded, order_check=True)
    if not rt.is_main:
        return 0
    res['checkpoint'] = rt.resume
    res['epoch'] = ckpt.get('epoch')
    res['model'] = describe(args)
    res['seconds'] = round(time.time() - t0, 2)
    log(f'\ntest results of {rt.resume} ({describe(args)}, {res["triplets"]} triplets, {res["seconds"]} s)')
    log(f'  {"notion":<12} accuracy')
    for n, acc in res['per_notion'].items():
        log(f'  {n:<12} {acc * 100:6.2f} %')
    log(f'  {"overall":<12} {res["accuracy"] * 100:6.2f} %')
    oc = res['order_check']
    log(f'  order check: {oc["swapped_accuracy"] * 100:.2f} % with far and close swapped, excess '
        f'{oc["excess"] * 100:+.2f} points (0 for a model that cannot see which slot holds the close image)')
    if oc['leaks']:
        log(f'warning: the model reads the answer from the order of the triplet\'s images: its accuracy with far and '
            f'close swapped ({oc["swapped_accuracy"] * 100:.2f} %) and as given ({res["accuracy"] * 100:.2f} %) add up '
            f'to {(1 + oc["excess"]) * 100:.2f} %, not 100 %; its accuracy is not comparable with an order-free '
            f'model\'s')
    os.makedirs(out_dir, exist_ok=True)
    retrieval_and_pictures(res, model, info, trip, store, rt, out_dir, embedded)
    path = os.path.join(out_dir, 'test_results.json')
    with atomic_open(path) as f:
        json.dump(res, f, indent=2)
    log(f'wrote {path}')
    return 0


def retrieval_and_pictures(res, model, info, trip, store, rt, out_dir, embedded=None):
    """After --test: retrieval mAP per notion over the test images (datasets with labels), the pictures, and with
    --export-embeddings every image's embedding next to the checkpoint. Adds the mAP to res. embedded: what evaluate
    embedded ({None or notion: (image indices, raw embeddings)}), so those images are not embedded again."""
    args, log = rt.args, rt.log
    if not getattr(model.embednet, 'per_notion_embedding', True):  # SCE-Net: its masks are weighed per triplet
        log(f'  no retrieval mAP, precision@1, MAP@R or pictures: {describe(args)} has no embedding per notion to '
            'retrieve with')
        return
    labels = read_labels(info)
    images = np.unique(trip)                                              # the test triplets' images
    emb = None
    if labels or args.pictures:
        emb = embed_dataset(model, images, store, rt, len(info.notions), embedded)
    if labels:
        r = retrieval_map(model, info, images, labels, rt, store, emb)
        res['mAP'], res['mAP_per_notion'] = r['mAP'], r['per_notion']
        log(f'  retrieval mAP over {len(images)} test images: '
            + ' '.join(f'{n} {v * 100:.1f}' for n, v in r['per_notion'].items() if v is not None)
            + f'  overall {r["mAP"] * 100:.2f} %')
        if pml_or_none() is None:
            log(f'  no precision@1 or MAP@R: pytorch-metric-learning is not installed ({INSTALL} to have them)')
        else:  # the standard metric-learning figures, on the same masked embeddings and labels
            m = notion_accuracies(emb[0], emb[1], images, labels, info.notions,
                                  parse_conditions(args.conditions, info.notions))
            res.update({f'pml_{k}': v for k, v in m.items()})
            for key, title in (('precision_at_1', 'precision@1'), ('map_at_r', 'MAP@R')):
                log(f'  {title} (pytorch-metric-learning): '
                    + ' '.join(f'{n} {v * 100:.1f}' for n, v in m[f'{key}_per_notion'].items() if v is not None)
                    + (f'  overall {m[key] * 100:.2f} %' if m[key] is not None else '  overall -'))
    else:
        log(f'  no retrieval mAP: {info.root} has no labels.csv (the paper\'s Zappos triplets come without labels)')
    if info.extra.get('protocol') and getattr(model.embednet, 'per_notion_embedding', True):
        p = protocol_results(model, info, rt, 'test', store)  # ASEN's retrieval protocol (get_data.py --dataset asen)
        res['protocol_mAP'], res['protocol_mAP_per_notion'] = p['mAP'], p['per_notion']
        log('  protocol mAP (queries against candidates, weighted by queries): '
            + ' '.join(f'{n} {v * 100:.1f}' for n, v in p['per_notion'].items()) + f'  overall {p["mAP"] * 100:.2f} %')
    if args.pictures:
        write_pictures(model, info, store, labels, rt, out_dir, images=images, emb=emb, log=log)
    if args.export_embeddings:
        export_embeddings(model, info, rt, os.path.dirname(os.path.abspath(rt.resume)), store, log)


def train(model, ckpt, info, conditions, rt, hflip, new=None):
    """Train from scratch or from a checkpoint; each epoch: train, validate, log, save. Returns the exit status.
    new: --add-notion's notion, the only one trained and validated (on --num_traintriplets of its triplets)."""
    args, log = rt.args, rt.log
    run_dir = run_dir_for(args)
    ckpt_path = os.path.join(run_dir, 'checkpoint.pth.tar')
    refuse_existing_run(ckpt, run_dir, ckpt_path, rt.resume)
    if ckpt is not None:
        check_training_state(ckpt, rt.resume)
    learn = conditions if new is None else [new]
    n_train = args.num_traintriplets if new is None else args.num_traintriplets * len(info.notions)
    train_t, train_c = load_triplets(info, 'train', learn, n_train, args.seed, args.skip_bad_triplets, log)
    val_t, val_c = load_triplets(info, 'val', learn, args.num_valtriplets, args.seed, args.skip_bad_triplets, log)
    store = make_store(info, rt)
    # the folder is locked only now that the inputs are known good: a refused run leaves no trace
    with RunLock(run_dir, 'trains') if rt.is_main else nullcontext():
        refuse_existing_run(ckpt, run_dir, ckpt_path, rt.resume)  # again: a run of the same name may have started
        return fit(model, ckpt, info, learn, conditions, rt, hflip, (train_t, train_c), (val_t, val_c), store)


def refuse_existing_run(ckpt, run_dir, ckpt_path, resume=''):
    """A new run never goes into a folder that holds one; a resumed run goes on only in its own folder or an empty
    one (never into another run's, whose checkpoint and metrics it would mix with its own)."""
    if ckpt is None and os.path.exists(ckpt_path):
        raise UserError(f'{run_dir} already holds a run; continue it with --resume {ckpt_path} (or --resume auto), '
                        f'or choose another --name')
    if ckpt is not None and resume and not same_folder(os.path.dirname(os.path.abspath(resume)), run_dir):
        held = [f for f in ('checkpoint.pth.tar', 'metrics.jsonl') if os.path.exists(os.path.join(run_dir, f))]
        if held:
            raise UserError(f'--resume {resume} into {run_dir}: that folder holds another run (its {held[0]}); going '
                            f'on there would mix the two runs\' checkpoints and metrics. Leave out --name to continue '
                            f'in {os.path.dirname(resume) or "."}, or choose a --name that is free')


def same_folder(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def fit(model, ckpt, info, learn, conditions, rt, hflip, train_set, val_set, store):
    """train's epochs, in the locked run folder: learn (the notions trained) on train_set, validated on val_set."""
    args, device, log = rt.args, rt.device, rt.log
    run_dir = run_dir_for(args)
    ckpt_path, best_path = os.path.join(run_dir, 'checkpoint.pth.tar'), os.path.join(run_dir, 'model_best.pth.tar')
    (train_t, train_c), (val_t, val_c) = train_set, val_set
    if ckpt is not None and rt.is_main and os.path.isdir(run_dir):
        for f in os.listdir(run_dir):  # temporary files of checkpoint writes that a kill interrupted
            if '.pth.tar.tmp' in f:
                os.remove(os.path.join(run_dir, f))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, args.lr, device)
    scaler = torch.amp.GradScaler(device.type, enabled=rt.use_scaler)
    next_epoch, next_step, best_acc, best_epoch, partial = args.start_epoch, 0, 0.0, 0, None
    if ckpt is not None:
        next_epoch, next_step, best_acc, best_epoch, partial = restore_training_state(ckpt, optimizer, scaler,
                                                                                      rt.resume)
        log(f'resumed {rt.resume}: epoch {next_epoch}, step {next_step}, best val accuracy {best_acc * 100:.2f} %')
    train_model = model
    if rt.world > 1:
        # broadcast_buffers=False: rank 0's buffers are the same either way (DDP broadcasts rank 0's own), and the
        # others' are replaced by rank 0's before evaluating (evaluate.broadcast_buffers); that saves a collective per
        # step, which NCCL's blocking wait (runtime.collective_error_env) would make the host wait for
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None,
            find_unused_parameters=args.model == 'task', broadcast_buffers=False)
    if args.compile:
        train_model = torch.compile(train_model)
    logger, saved_args = Logger(), {**vars(args), 'resume': rt.resume, 'workers': rt.workers}
    if rt.is_main:
        os.makedirs(run_dir, exist_ok=True)
        with atomic_open(os.path.join(run_dir, 'args.json')) as f:
            json.dump({**saved_args, 'hflip_applied': hflip}, f, indent=2)
        metrics_path = os.path.join(run_dir, 'metrics.jsonl')
        going_on = next_epoch <= args.epochs and not plateaued(next_epoch - 1, best_epoch, args.patience)
        keep_metrics(metrics_path, next_epoch, log, going_on)
        logger = make_logger(args, info.notions, run_dir)
        if logger.loggers and ckpt is None:
            logger.log_triplets(store.get(val_t[:8][:, [0, 2, 1]].reshape(-1)).reshape(-1, 3, args.image_size,
                                                                                        args.image_size, 3))
    log(f'{describe(args)} on {info.name}: notions {[info.notions[c] for c in learn]}, {len(train_t)} train and '
        f'{len(val_t)} val triplets, batch {args.batch_size}, epochs {next_epoch}..{args.epochs}')
    rt.stop.install()

    def checkpoint_state(next_e, next_s, part):
        return {'epoch': next_e - 1 if next_s == 0 else next_e, 'next_epoch': next_e, 'next_step': next_s,
                'partial': part, 'state_dict': model.state_dict(), 'optimizer': optimizer.state_dict(),
                'scaler': scaler.state_dict() if rt.use_scaler else None, 'best_acc': best_acc,
                'best_epoch': best_epoch, 'args': saved_args,
                'notions': list(info.notions), 'conditions': list(conditions), 'hflip_applied': hflip,
                'rng': runtime.rng_state()}

    stopped = (ckpt or {}).get('stopped') or 'cap'  # what a resumed run with no epoch left to train had stopped by
    for epoch in range(next_epoch, args.epochs + 1):
        if plateaued(epoch - 1, best_epoch, args.patience):  # a resumed run that had already stopped at a plateau
            stopped = 'plateau'
            break
        lr = args.lr * (0.985 ** epoch)
        for group in optimizer.param_groups:
            group['lr'] = lr
        t0 = time.time()
        sums, finished = train_epoch(model, train_model, optimizer, scaler, (train_t, train_c, store, hflip), rt, epoch,
                                     next_step, partial)
        if not finished:
            if rt.is_main:
                save_checkpoint({**checkpoint_state(epoch, sums['steps'], sums), 'stopped': 'interrupted'}, ckpt_path)
                log(f'stopped: interrupted at epoch {epoch}, step {sums["steps"]}; continue with --resume {ckpt_path}')
            return 130
        next_step, partial = 0, None
        train_seconds = time.time() - t0
        val = evaluate(model, val_t, val_c, store, rt, info.notions)
        is_best = val['accuracy'] > best_acc
        if is_best:
            best_acc, best_epoch = val['accuracy'], epoch
        steps = max(sums['steps'], 1)
        m = {'epoch': epoch, 'lr': lr, 'train_loss': sums['loss'] / max(sums['n'], 1),
             'train_acc': sums['correct'] / max(sums['n'], 1), 'val_loss': val['loss'], 'val_acc': val['accuracy'],
             'val_acc_per_notion': val['per_notion'], 'emb_norm': sums['emb_norm'] / steps,
             'mask_norm': sums['mask_norm'] / steps, 'seconds': round(time.time() - t0, 2),
             'triplets_per_s': round(sums['n'] / max(train_seconds, 1e-9), 1), 'best_acc': best_acc}
        reason = stop_reason(epoch, best_epoch, args.patience, args.epochs)
        if reason:
            m['stopped'] = stopped = reason
        if rt.is_main:
            per = ' '.join(f'{k} {v * 100:.1f}' for k, v in val['per_notion'].items())
            log(f'epoch {epoch:3d}  lr {lr:.2e}  train loss {m["train_loss"]:.4f} acc {m["train_acc"] * 100:.2f}  '
                f'val acc {val["accuracy"] * 100:.2f} ({per})  {m["triplets_per_s"]:.0f} triplets/s  '
                f'{m["seconds"]:.0f} s'
                f'{"  *best*" if is_best else ""}')
            with open_append(metrics_path, 'metrics file') as f:  # a link planted there is refused
                f.write(json.dumps(m) + '\n')
            state = {**checkpoint_state(epoch + 1, 0, None), 'stopped': reason}
            if is_best:
                save_checkpoint(state, best_path)
            save_checkpoint(state, ckpt_path)
            if logger.loggers:
                logger.log_epoch(m)
                masks = model.embednet.mask_weights()
                logger.log_masks(epoch, None if masks is None else masks.detach().float().cpu().numpy())
        if reason:
            break
    if rt.is_main:
        if logger.loggers:
            log_val_embeddings(logger, model, info, val_t, store, rt)
            logger.close()
        log(f'done: best val accuracy {best_acc * 100:.2f} % at epoch {best_epoch}; '
            f'{explain(stopped, best_epoch, args.patience, args.epochs)}; test it with '
            f'python main.py --test --resume {best_path}')
    return 0


TRAINING_STATE = ('optimizer', 'next_epoch', 'next_step', 'best_acc', 'best_epoch', 'rng')


def check_training_state(ckpt, resume):
    """CheckpointError for a checkpoint to resume that holds a model but not the state of its run."""
    missing = [k for k in TRAINING_STATE if k not in ckpt]
    if missing:
        raise CheckpointError(f'--resume {resume}: the checkpoint has no {", ".join(missing)}: it holds a model but '
                              f'not the state a run goes on from (a checkpoint stripped, or made elsewhere); test it '
                              f'(--test), query it (retrieve.py), or teach it a notion (--add-notion)')


def restore_training_state(ckpt, optimizer, scaler, resume):
    """Load a resumed checkpoint's optimizer, scaler and RNG states: (next epoch, next step, best accuracy, best epoch,
    partial epoch's sums). CheckpointError for a state that does not fit."""
    check_training_state(ckpt, resume)
    try:
        optimizer.load_state_dict(ckpt['optimizer'])
        if ckpt.get('scaler'):
            scaler.load_state_dict(ckpt['scaler'])
        runtime.set_rng_state(ckpt['rng'])
        return (int(ckpt['next_epoch']), int(ckpt['next_step']), float(ckpt['best_acc']), int(ckpt['best_epoch']),
                ckpt.get('partial'))
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
        why = (str(e).strip().splitlines() or [''])[0][:200]
        raise CheckpointError(f'--resume {resume}: its training state does not fit this model ({type(e).__name__}: '
                              f'{why}); the checkpoint is damaged or of another run: test it (--test) or use another') \
            from None


def log_val_embeddings(logger, model, info, val_t, store, rt, n=500):
    """A sample of val images, their embeddings (masked per notion for a CSN) and labels for TensorBoard's projector."""
    images = np.unique(val_t)[:n]
    net = model.embednet
    emb = embed_images(model, images, store, rt, c=0 if net.per_notion_backbone else None)
    labels = read_labels(info)
    meta = ({k: [v[i] for i in images] for k, v in labels.items()} if labels
            else {'image': [info.filenames[i] for i in images]})  # no labels.csv: the projector names the files
    logger.log_embeddings(emb.cpu().numpy(), meta, store.get(images))


def keep_metrics(path, next_epoch, log=print, going_on=False):
    """Drop metrics lines of epochs that will be trained again (a run killed between its log line and checkpoint),
    and a last line that a kill cut short (with a warning: that epoch is trained again, so nothing is lost). going_on:
    the run trains more epochs, so where it had stopped (the last line's "stopped") is no longer its end."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        lines = f.readlines()
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            m = json.loads(ln)
        except json.JSONDecodeError:
            if i == len(lines):
                log(f'warning: {path}:{i}: dropped a partial last line (a kill while it was written)')
                continue
            raise UserError(f'{path}:{i}: not a JSON line ({ln.strip()[:80]!r}); the file was edited or damaged: '
                            f'fix or delete that line, then --resume again') from None
        if not (isinstance(m, dict) and isinstance(m.get('epoch'), int) and not isinstance(m['epoch'], bool)):
            raise UserError(f'{path}:{i}: not an epoch\'s record ({ln.strip()[:80]!r}: each line is a JSON object '
                            f'with an integer "epoch"); the file was edited or damaged: fix or delete that line, then '
                            f'--resume again')
        if m['epoch'] < next_epoch:
            if going_on and 'stopped' in m:
                ln = json.dumps({k: v for k, v in m.items() if k != 'stopped'})
            kept.append(ln if ln.endswith('\n') else ln + '\n')
    with atomic_open(path) as f:
        f.writelines(kept)


if __name__ == '__main__':
    sys.exit(run_script(main))

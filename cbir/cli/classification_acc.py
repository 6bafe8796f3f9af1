"""cbir-classification-acc: accuracy of a classification head at the three levels (thesis: classification_acc)."""

from __future__ import annotations

import argparse
import json

from cbir.cli.common import (at_least, build_extractor, check_extractor_args, check_protocol_args, command_parser,
                             entry_point, extractor_args, non_negative, positive, protocol_args)
from cbir.files import atomic_path, check_output_file, write_text_atomically


def parser() -> argparse.ArgumentParser:
    p = command_parser(
        "cbir-classification-acc",
        "Train a linear classification head on the extractor's (frozen) features of --training_data, "
        "then score its predictions on --path at the class, project and similar levels by the "
        "retrieval protocols. top-5: the true class among the 5 highest logits; maj is n/a.",
    )
    p.add_argument("--training_data", required=True, help="folder with one sub-folder per class (the head's data)")
    protocol_args(p, default_measure="all")
    p.add_argument("--num_epochs", type=at_least(1), default=30, help="epochs of the head (default 30)")
    p.add_argument("--lr", type=positive, default=1e-2, help="learning rate of the head (default 1e-2)")
    p.add_argument("--decay", type=non_negative, default=1e-4, help="weight decay of the head (default 1e-4)")
    p.add_argument("--head_batch_size", type=at_least(1), default=64,
                   help="batch size of the head's training (default 64)")
    p.add_argument("--name", default="classifier", help="separated: sheet name (default: classifier)")
    p.add_argument("--save_head", default=None, help="save the trained head here (torch file of tensors)")
    extractor_args(p)
    return p


def check(args):
    """Every flag before any work; the level maps."""
    check_extractor_args(args)
    if args.save_head:
        check_output_file(args.save_head, "save_head")
    return check_protocol_args(args, sheet=args.name)


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    maps = check(args)

    # Heavy parts (torch, FAISS, pandas) load only now, after the flags are checked: bad flags answer at once.
    import torch

    from cbir.classification import classification_accuracy, require_two_classes
    from cbir.images import list_samples
    from cbir.evaluation import plot_confusion_matrices, write_excel_sheet

    train_samples = list_samples(args.training_data)
    queries = list_samples(args.path)
    require_two_classes(train_samples)
    extractor = build_extractor(args, None)
    result = classification_accuracy(
        extractor, train_samples, queries, measure=args.measure, num_epochs=args.num_epochs, lr=args.lr,
        head_batch_size=args.head_batch_size, weight_decay=args.decay, seed=args.seed, batch_size=args.batch_size,
        num_workers=args.num_workers, repeats=args.repeats, maps=maps, max_queries=args.max_queries,
        remove_classes=args.remove_classes.split(",") if args.remove_classes else None,
        project_name=args.project_name, class_name=args.class_name, bootstrap=args.bootstrap,
    )
    report = result.report
    print(result.format())
    if args.measure == "separated" and report.per_class is not None:
        write_excel_sheet(report.per_class, args.excel_path, args.name)
        print(f"per-class rows: sheet '{args.name}' of {args.excel_path}")
    if args.cms:
        for figure in plot_confusion_matrices(report.per_query, args.cms):
            print(f"confusion matrix: {figure}")
    if args.output:
        numbers = report.to_dict()
        numbers["training"] = {"images": result.n_train, "classes": result.head.class_names,
                               "history": result.history, "seconds": result.seconds_train}
        write_text_atomically(args.output, json.dumps(numbers, indent=2))
        print(f"numbers: {args.output}")
    if args.save_head:
        with atomic_path(args.save_head) as temporary:
            torch.save({**result.head.state(), "extractor": extractor.describe()}, temporary)
        print(f"head: {args.save_head}")


console_script = entry_point(main)

"""`publish_int8`: a published version's int8 file as the next version of the same model, to A/B it against float."""
from __future__ import annotations

import argparse

from training_job.errors import UserError


def register(subparsers) -> None:
    from training_job.commands.publish import add_registry_arguments

    parser = subparsers.add_parser(
        "publish_int8", help="publish version N's int8 TFLite file as the next version, to A/B it against N",
        description="Copy published version N (which holds assets.extra/tflite/model_int8.tflite) as the next "
        "version of the same model, with the int8 file as model.tflite and assets.extra/variant.json naming N. "
        "Under --prefer_tflite_model the model server serves it with LiteRT (after its parity check against the "
        "SavedModel); the gateway's routing and the rollout controller treat it as any new version, so its "
        "accuracy on live traffic is judged by the same feedback verdict as a retrained model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", type=int, required=True, help="the published float version")
    add_registry_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from training_job.commands.publish import registry_of
    from training_job.tflite_export import publish_int8_as_version

    registry = registry_of(args)
    version_dir = registry / args.model_name / str(args.version)
    if not version_dir.is_dir():
        raise UserError(f"{args.model_name} has no published version {args.version} in {registry}")
    try:
        n, variant_dir = publish_int8_as_version(version_dir, registry, args.model_name)
    except PermissionError as exc:
        raise UserError(f"cannot write to the registry: {exc}") from None
    print(f"published the int8 variant of {args.model_name} version {args.version} as version {n}: {variant_dir}")
    return 0

"""Compute the retrieval-head profiles of the embedded models and ship them in kvcli/data/profiles.

    python scripts/make_profiles.py [MODEL ...]

Users of other models get theirs computed on first use (kvcli/profile.py); shipping these
saves the embedded models that first minute.
"""

import argparse

from kvcli.atomic import write_atomic
from kvcli.models import EMBEDDED, load_model
from kvcli.profile import PACKAGED, compute_profile, profile_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", metavar="MODEL", help=f"models to profile (default: the embedded ones, {', '.join(EMBEDDED)})")
    names = parser.parse_args(argv).models or list(EMBEDDED)
    PACKAGED.mkdir(parents=True, exist_ok=True)
    for name in names:
        lm = load_model(name)
        profile = compute_profile(lm.model, lm.tokenizer, lm.name, progress=lambda done, total: print(f"{name}: {done}/{total}", flush=True))
        target = PACKAGED / profile_path(lm.name, lm.config_hash).name
        write_atomic(target, profile.to_json())
        heads = profile.top_heads(8, max_layer=int(0.75 * (lm.model.config.num_hidden_layers - 1)))
        print(f"wrote {target}; top heads (layer, head): {heads}")


if __name__ == "__main__":
    main()

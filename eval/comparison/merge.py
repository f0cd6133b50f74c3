"""Put a re-run beside a published comparison: some models re-trained (issue 24: MiniLLM with a
fix), every other row reused from the published run, the statistics recomputed over both.

Pairing a new model with old rows is only honest when the re-run rebuilt the same teacher and the
same start, so the models named in ``check`` (typically the teacher and the SFT student, which the
re-run evaluates anyway) must have *identical* per-item scores in both runs on every test set both
scored: sampling with the same seeds from the same weights gives the same texts, so any change in
a weight shows up as a different score. Otherwise the merge is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from minidistill.errors import UserError

from .report import assemble, make_table


def load_published(folder: Path) -> tuple[dict, dict[str, dict]]:
    """results.json of a comparison folder (--out or --publish) and the summary of each of its models."""
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise UserError(f"{path}: not found (a comparison's --out or --publish folder was expected)")
    results = json.loads(path.read_text())
    summaries = {}
    for name in results["models"]:
        for candidate in (Path(folder) / f"{name}.summary.json", Path(folder) / "eval" / name / "summary.json"):
            if candidate.is_file():
                summaries[name] = json.loads(candidate.read_text())
                break
        else:
            raise UserError(
                f"{folder}: no summary for model '{name}' ({name}.summary.json or eval/{name}/summary.json)"
            )
    return results, summaries


def same_scores(a: dict, b: dict) -> dict:
    """Per common test set: items compared, whether every item's per-seed scores are identical, the
    largest absolute difference. Empty when the two share no test set (then nothing was checked)."""
    out = {}
    for ds in sorted(set(a["item_scores"]) & set(b["item_scores"])):
        sa, sb = a["item_scores"][ds], b["item_scores"][ds]
        items = sorted(set(sa) & set(sb), key=int)
        diffs = [abs(x - y) for i in items for x, y in zip(sa[i], sb[i])]
        shapes = all(len(sa[i]) == len(sb[i]) for i in items) and set(sa) == set(sb)
        out[ds] = {
            "n_items": len(items),
            "identical": shapes and max(diffs, default=0.0) == 0.0,
            "max_abs_diff": max(diffs, default=0.0),
        }
    return out


def merge(published: Path, rerun: Path, take: list[str], rename: dict[str, str], check: list[str]) -> tuple[dict, str]:
    """(results, table.md) of the published models (renamed per ``rename``) plus ``take`` from the
    re-run; UserError (one line) when a checked model differs or a name is missing or taken twice."""
    pub, pub_sm = load_published(published)
    new, new_sm = load_published(rerun)
    for name in take + check:
        if name not in new_sm:
            raise UserError(f"{rerun}: model '{name}' was not evaluated there (has {', '.join(new_sm)})")
    for old in rename:
        if old not in pub_sm:
            raise UserError(f"--rename: '{old}' is not a model of {published} (has {', '.join(pub_sm)})")
    verified = {}
    for name in check:
        if name not in pub_sm:
            raise UserError(f"--check: '{name}' is not a model of {published}")
        verified[name] = same_scores(pub_sm[name], new_sm[name])
        bad = [ds for ds, v in verified[name].items() if not v["identical"]]
        if bad or not verified[name]:
            where = ", ".join(f"{ds} (max |diff| {verified[name][ds]['max_abs_diff']:.3g})" for ds in bad)
            raise UserError(
                f"--check {name}: the re-run's scores differ from the published ones on {where or 'no common test set'}; "
                "it did not rebuild the same model, so its rows cannot be paired with the published ones"
            )
    summaries: dict[str, dict] = {}
    training: dict[str, dict] = {}
    for old in pub_sm:
        if old in take:  # the re-trained model takes the published one's place; the old one follows it
            summaries[old], training[old] = new_sm[old], dict(new["training"].get(old, {}))
        label = rename.get(old, old)
        if label in summaries:
            raise UserError(f"--rename: '{label}' is used twice (rename the published '{old}' to a free name)")
        summaries[label], training[label] = pub_sm[old], dict(pub["training"].get(old, {}))
    for name in take:
        summaries.setdefault(name, new_sm[name])
        training.setdefault(name, dict(new["training"].get(name, {})))
    results = assemble(pub["settings"], pub["train_data"], training, summaries, pub["settings"]["bootstrap"])
    results["merge"] = {
        "published": str(published),
        "rerun": str(rerun),
        "taken_from_rerun": take,
        "renamed": rename,
        "checked_identical": verified,
        "rerun_settings": new["settings"],
    }
    note = (
        f"Merged: {', '.join(take)} re-trained and scored in `{rerun}`; every other row from `{published}`"
        + (f" ({', '.join(f'published {o} shown as {n}' for o, n in rename.items())})" if rename else "")
        + ". "
        + (
            f"The re-run rebuilt {', '.join(check)}: per-item scores identical to the published ones ("
            + "; ".join(f"{n} {ds} {v['n_items']} items" for n, per in verified.items() for ds, v in per.items())
            + "), so the published rows are paired with the new ones."
            if check
            else ""
        )
    )
    return results, note + "\n\n" + make_table(results)

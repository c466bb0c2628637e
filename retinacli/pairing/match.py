"""Matching OCT volumes with fundus images: same file, localizer reference, then patient + eye + nearest
time within a window (ties listed as ambiguous, never guessed)."""

from __future__ import annotations

from collections import defaultdict

from retinacli.pairing.entries import NO_KEY, Entry, Pair, Unpaired


def _hours(a: Entry, b: Entry) -> float | None:
    if a.when is None or b.when is None:
        return None
    return abs((a.when - b.when).total_seconds()) / 3600.0



def pair_entries(entries: list[Entry], window_hours: float = 24.0) -> tuple[list[Pair], list[Unpaired]]:
    unpaired: list[Unpaired] = [Unpaired(e.path, e.modality, e.held) for e in entries if e.held]
    octs = [e for e in entries if e.modality == "oct" and not e.held]
    fundi = [e for e in entries if e.modality == "fundus" and not e.held]
    pairs: list[Pair] = []
    paired_octs: set[int] = set()
    used_fundi: set[int] = set()

    # 1. one file holding both (Heidelberg .vol: B-scans + IR-SLO)
    fundus_by_path = {str(f.path): i for i, f in enumerate(fundi)}
    for oi, entry in enumerate(octs):
        fi = fundus_by_path.get(str(entry.path))
        if fi is not None:
            pairs.append(Pair(entry, fundi[fi], "same-file", 0.0))
            paired_octs.add(oi)
            used_fundi.add(fi)

    # 2. the OCT names its localizer; one fundus may be the localizer of several OCT scans
    fundus_by_uid = {f.meta.sop_instance_uid: i for i, f in enumerate(fundi) if f.meta.sop_instance_uid}
    missing_localizer: set[int] = set()
    for oi, entry in enumerate(octs):
        if oi in paired_octs or not entry.meta.referenced_sop_uids:
            continue
        hits = [fundus_by_uid[uid] for uid in entry.meta.referenced_sop_uids if uid in fundus_by_uid]
        if hits:
            fi = hits[0]
            pairs.append(Pair(entry, fundi[fi], "reference", _hours(entry, fundi[fi])))
            paired_octs.add(oi)
            used_fundi.add(fi)
        else:
            missing_localizer.add(oi)

    # 3. same patient and eye, nearest in time within the window, closest first, 1:1
    def key(entry: Entry) -> tuple[str, str] | None:
        if not entry.meta.patient_id or not entry.meta.laterality:
            return None
        return entry.meta.patient_id, entry.meta.laterality

    fundi_by_key: dict[tuple[str, str], list[int]] = defaultdict(list)
    for fi, entry in enumerate(fundi):
        if fi not in used_fundi and key(entry) and entry.when:
            fundi_by_key[key(entry)].append(fi)
    candidates: list[tuple[float, int, int]] = []
    for oi, entry in enumerate(octs):
        if oi in paired_octs or key(entry) is None or entry.when is None:
            continue
        for fi in fundi_by_key.get(key(entry), []):
            hours = _hours(entry, fundi[fi])
            if hours is not None and hours <= window_hours:
                candidates.append((hours, oi, fi))
    # A tie (dates without times, say) is not guessed: every item of it is listed as ambiguous.
    by_oct: dict[tuple[int, float], list[int]] = defaultdict(list)
    by_fundus: dict[tuple[int, float], list[int]] = defaultdict(list)
    for hours, oi, fi in candidates:
        by_oct[(oi, hours)].append(fi)
        by_fundus[(fi, hours)].append(oi)
    taken_by_closer: set[int] = set()
    behind_a_tie: set[int] = set()
    ambiguous_octs: dict[int, str] = {}
    ambiguous_fundi: dict[int, str] = {}
    for hours, oi, fi in sorted(candidates):
        if oi in paired_octs or oi in ambiguous_octs:
            continue
        if fi in used_fundi or fi in ambiguous_fundi:
            (taken_by_closer if fi in used_fundi else behind_a_tie).add(oi)
            continue
        tied_fundi = [f for f in by_oct[(oi, hours)] if f not in used_fundi and f not in ambiguous_fundi]
        tied_octs = [o for o in by_fundus[(fi, hours)] if o not in paired_octs and o not in ambiguous_octs]
        if len(tied_fundi) > 1 or len(tied_octs) > 1:
            reason = (f"ambiguous: {len(tied_octs)} OCT volume(s) and {len(tied_fundi)} fundus image(s) "
                      "of the same patient and eye are equally close in time; give acquisition times "
                      "(a time column or {time} group) or pair them by hand")
            ambiguous_octs.update(dict.fromkeys(tied_octs, reason))
            ambiguous_fundi.update(dict.fromkeys(tied_fundi, reason))
            continue
        pairs.append(Pair(octs[oi], fundi[fi], "time", hours))
        paired_octs.add(oi)
        used_fundi.add(fi)

    window = f"{window_hours:g} h"
    for oi, entry in enumerate(octs):
        if oi in paired_octs:
            continue
        if key(entry) is None or entry.when is None:
            reason = entry.unknown or NO_KEY
        elif oi in ambiguous_octs:
            reason = ambiguous_octs[oi]
        elif oi in taken_by_closer:
            reason = f"the fundus images within {window} were paired with closer OCT scans"
            if oi in behind_a_tie:
                reason += " or are ambiguous"
        elif oi in behind_a_tie:
            reason = f"the fundus images within {window} are ambiguous (equally close to other OCT scans)"
        else:
            reason = f"no fundus image of the same patient and eye within {window}"
        if oi in missing_localizer:
            reason = f"its referenced localizer image was not found, and {reason}"
        unpaired.append(Unpaired(entry.path, "oct", reason))
    for fi, entry in enumerate(fundi):
        if fi in used_fundi:
            continue
        if key(entry) is None or entry.when is None:
            reason = entry.unknown or NO_KEY
        elif fi in ambiguous_fundi:
            reason = ambiguous_fundi[fi]
        else:
            reason = f"no OCT volume of the same patient and eye within {window}"
        unpaired.append(Unpaired(entry.path, "fundus", reason))
    pairs.sort(key=lambda p: (p.oct.meta.patient_id or "", p.oct.meta.laterality or "", str(p.oct.when)))
    return pairs, unpaired

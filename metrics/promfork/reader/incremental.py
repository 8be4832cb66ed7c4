"""The long-lived reader of a multiprocess directory: what it parsed, merged and rendered, kept between scrapes.

``promfork.reader.merge.merge_files`` re-reads and re-parses every file and rebuilds
every sample on every scrape, and formatting them costs about as much again.
This reader keeps, for as long as its process serves scrapes:

* per file (by name, inode and device): the bytes read last time, each
  entry's parsed key and value offset, and its entries grouped by family. A
  scrape reads each file's used bytes once (``fileformat.read_snapshot``);
  identical bytes cost one comparison; otherwise blocks are compared and the
  entries in differing blocks checked, entries past the previous end parsed
  (files are append-only). A file whose keys changed under the same name and
  inode (an archive rewritten into a freed inode), that shrank or that became
  unreadable is parsed afresh or dropped.
* per family: its label sets (a histogram's buckets, ``_sum`` and ``_count``;
  one sample of a counter; an ``all`` gauge's value of one process) with
  their merged samples and, per exposition format, their rendered lines and
  each line's prefix up to the value.

A family whose entries came or went (a new worker, a new series, compaction)
is merged whole by ``promfork.reader.merge.FamilyMerge``, exactly as ``merge_files``
merges it, and families are put in the order a merge of all files meets them:
a long-lived reader answers sample for sample and in the same order what a new
one would. When only values moved, the label sets they feed are merged again:
summed ones through a ``SummedLabelSet`` plan (exact sums, archive remainders,
cumulative buckets) over their inputs' cached values, others through
``FamilyMerge``; families where a value decides whether a label set shows at
all (``mostrecent`` gauges) are merged whole. Only label sets whose values
changed are formatted again: after their cached line prefixes when their
sample keys held, otherwise by prometheus-client's encoder, one call per
family. Everything held for a file is dropped with it.

The reader does no locking: its owner (promfork.reader.collector) calls it under the
directory lock, one thread at a time.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Collection, Iterable, Mapping

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Exemplar, Sample
from prometheus_client.utils import floatToGoString

from promfork.directory import fileformat, filenames
from promfork.reader.merge import FamilyMerge, SummedLabelSet, group_key, is_summed, orders_by_value, parse_key

Encoder = Callable[[object], bytes]  # prometheus-client's generate_latest, text or OpenMetrics
_BLOCK = 2048  # bytes compared at a time when a file changed
_EOF = "# EOF\n"


class _File:
    """One file's cached parse: its entries in file order, and which family each one belongs to."""

    __slots__ = ("__weakref__", "data", "device", "families", "info", "inode", "offsets", "rows", "slots")

    def __init__(self, info: filenames.DbFile, snapshot: fileformat.Snapshot) -> None:
        self.info = info
        self.inode = snapshot.inode
        self.device = snapshot.device
        self.data = b""
        self.offsets: list[int] = []  # byte where each entry's value begins (the entry ends 16 bytes later)
        self.rows: list[tuple] = []  # parsed key of each entry
        self.families: dict[str, list[int]] = {}  # metric name -> its entries, names in the order first met
        # entry -> (label set, position among its inputs); valid for families whose inputs are indexed
        self.slots: list[tuple[_Group, int] | None] = []


class _Group:
    """One label set of a family: its merged samples, their rendered lines, and (once indexed) its inputs."""

    __slots__ = ("inputs", "key", "lines", "plan", "prefixes", "samples", "stamps", "values")

    def __init__(self, key: tuple, samples: list[Sample]) -> None:
        self.key = key  # the labels as stored (no const labels); an all gauge's include pid
        self.samples = samples
        self.lines: dict[str, str] = {}  # format -> this label set's sample lines
        # format -> each sample's line up to its value, as the encoder wrote it (None: the line has another shape)
        self.prefixes: dict[str, list[str] | None] = {}
        self.inputs: list[tuple[_File, int]] = []  # (file, entry) in directory and file order
        self.values: list[float] = []  # each input's value and timestamp, as last read
        self.stamps: list[float] = []
        self.plan: SummedLabelSet | None = None


class _Family:
    """One metric family: its label sets in exposition order and its rendered header per format."""

    __slots__ = ("by_value", "groups", "headers", "help", "indexed", "kind", "name")

    def __init__(self, name: str, help_text: str, kind: str) -> None:
        self.name = name
        self.help = help_text
        self.kind = kind
        self.groups: dict[tuple, _Group] = {}
        self.headers: dict[str, str] = {}
        self.indexed = False  # inputs of every label set known (built on the first change after a merge)
        self.by_value = False  # some input decides by its value whether its label set shows (mostrecent)

    def metric(self, samples: list[Sample]) -> Metric:
        """A new Metric of this family holding `samples`."""
        metric = Metric(self.name, self.help, self.kind)
        metric.samples = samples
        return metric


class _OneMetric:
    """A collector of one metric: what prometheus-client's encoders take."""

    __slots__ = ("metric",)

    def __init__(self, metric: Metric) -> None:
        self.metric = metric

    def collect(self) -> Iterable[Metric]:
        return (self.metric,)


def _encode(encoder: Encoder, metric: Metric) -> list[str]:
    """The lines `encoder` writes for `metric`, without a trailing ``# EOF``."""
    lines = encoder(_OneMetric(metric)).decode("utf-8").splitlines(keepends=True)
    if lines and lines[-1] == _EOF:
        lines.pop()
    return lines


class IncrementalReader:
    """Reads a multiprocess directory scrape after scrape, at a cost that follows what changed."""

    def __init__(self, directory: str, const_labels: Mapping[str, str] | None = None) -> None:
        self.directory = directory
        self.const_labels = dict(const_labels or {})
        self._files: dict[str, _File] = {}
        self._families: dict[str, _Family] = {}
        self._keys: dict[bytes, tuple] = {}  # raw key -> parsed, shared by every file holding it

    def files(self) -> list[str]:
        """Names of the files whose parse is cached (those readable at the last update)."""
        return list(self._files)

    def update(self, names: Iterable[str]) -> list[str]:
        """Bring the cache up to the files `names` (sorted ``*.db`` names); return those that are damaged.

        A file that vanished since it was listed is skipped, as in
        ``merge_files``; so is a damaged file, whose name is returned and whose
        cache is dropped.
        """
        changed: list[tuple[_File, int]] = []  # entries whose value moved
        reshaped: set[str] = set()  # families that gained or lost entries: merged whole
        kept: dict[str, _File] = {}
        damaged: list[str] = []
        for name in names:
            old = self._files.get(name)
            path = os.path.join(self.directory, name)
            try:
                snapshot = fileformat.read_snapshot(path)
                if old is not None and self._follow(old, snapshot, changed, reshaped):
                    kept[name] = old
                    continue
                kept[name] = file = self._parse(filenames.parse_name(name), snapshot)
                reshaped.update(file.families)
            except FileNotFoundError:
                pass
            except fileformat.CorruptFile:
                # Once more, from scratch: a writer's file is headerless for an instant after
                # its creation (and a reader without memory barriers may see a write late).
                try:
                    kept[name] = file = self._parse(filenames.parse_name(name), fileformat.read_snapshot(path))
                    reshaped.update(file.families)
                except FileNotFoundError:
                    pass
                except fileformat.CorruptFile:
                    damaged.append(name)
            if old is not None:
                reshaped.update(old.families)
        for name, old in self._files.items():
            if name not in kept:
                reshaped.update(old.families)
        self._files = kept
        if reshaped:
            self._reorder(reshaped)
        self._apply(changed, reshaped)
        return damaged

    def _follow(self, file: _File, snapshot: fileformat.Snapshot, changed: list, reshaped: set[str]) -> bool:
        """Apply a new snapshot of a cached file; False if it must be parsed afresh (replaced or rewritten)."""
        data, old = snapshot.data, file.data
        if (snapshot.inode, snapshot.device) != (file.inode, file.device) or len(data) < len(old):
            return False
        if data == old:
            return True
        moved = []
        common = len(old)
        offsets = file.offsets
        pos = fileformat.FIRST_ENTRY
        while pos < common:
            end = min(pos + _BLOCK, common)
            if data[pos:end] != old[pos:end]:
                # every entry overlapping this block (entry i ends at its value offset + 16, where i + 1 starts):
                # its key must be as cached, its value may have moved
                first = bisect.bisect_right(offsets, pos - 16)
                last = min(bisect.bisect_left(offsets, end - 16) + 1, len(offsets))
                for i in range(first, last):
                    start, value_at = offsets[i - 1] + 16 if i else fileformat.FIRST_ENTRY, offsets[i]
                    if data[start:value_at] != old[start:value_at]:
                        return False
                    if data[value_at : value_at + 16] != old[value_at : value_at + 16]:
                        moved.append(i)
            pos = end
        if len(data) > common:
            grown = len(file.rows)
            self._add_entries(file, data, max(common, fileformat.FIRST_ENTRY))
            reshaped.update(row[0] for row in file.rows[grown:])
        file.data = data
        changed += [(file, i) for i in moved]
        return True

    def _parse(self, info: filenames.DbFile, snapshot: fileformat.Snapshot) -> _File:
        file = _File(info, snapshot)
        if snapshot.data:
            self._add_entries(file, snapshot.data, fileformat.FIRST_ENTRY)
        file.data = snapshot.data
        return file

    def _add_entries(self, file: _File, data: bytes, start: int) -> None:
        """Parse the entries of `data` from `start` into `file`; CorruptFile leaves `file` unchanged."""
        cache = self._keys
        try:
            keys, offsets = fileformat.index_entries(data, start)
            rows = [cache.get(raw) or self._parse_key(raw) for raw in keys]
        except fileformat.CorruptFile as exc:
            raise fileformat.CorruptFile(f"{file.info.name}: {exc}") from None
        families = file.families
        for i, row in enumerate(rows, len(file.rows)):
            entries = families.get(row[0])
            if entries is None:
                families[row[0]] = [i]
            else:
                entries.append(i)
        file.offsets += offsets
        file.rows += rows
        file.slots += [None] * len(rows)

    def _parse_key(self, raw: bytes) -> tuple:
        try:
            row = self._keys[raw] = parse_key(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise fileformat.CorruptFile("a key is not UTF-8") from None
        except ValueError as exc:
            raise fileformat.CorruptFile(str(exc)) from None
        return row

    def _reorder(self, reshaped: set[str]) -> None:
        """Families in the order a merge of all files meets them; families that gained or lost entries merged whole."""
        order: dict[str, None] = {}
        for file in self._files.values():
            order.update(dict.fromkeys(file.families))
        families = {}
        for name in order:
            family = self._families.get(name)
            if family is None or name in reshaped:
                family = self._merge_family(name, family)
            families[name] = family
        self._families = families
        if len(self._keys) > 2 * sum(len(f.rows) for f in self._files.values()) + 1024:
            self._keys = {}  # mostly keys of files that went: start again from the next new file

    def _merge_family(self, name: str, before: _Family | None) -> _Family:
        """Merge every entry of a family, as ``merge_files`` does; label sets whose samples held keep their lines."""
        merged = None
        family = None
        unpack = fileformat.unpack_value
        for file in self._files.values():
            entries = file.families.get(name)
            if not entries:
                continue
            info, rows, offsets, data = file.info, file.rows, file.offsets, file.data
            if merged is None:
                family = _Family(name, rows[entries[0]][3], info.kind)
                merged = FamilyMerge(Metric(name, family.help, family.kind))
            family.by_value = family.by_value or orders_by_value(info)
            merged.add_rows(info, [rows[i] for i in entries], [unpack(data, offsets[i]) for i in entries])
            slots = file.slots
            for i in entries:
                slots[i] = None  # indexed again on the next change; until then nothing holds the old label sets
        if before is not None and (before.help, before.kind) == (family.help, family.kind):
            family.headers = before.headers
        old_groups = before.groups if before is not None else {}
        const = self.const_labels
        for key, samples in merged.finish_by_label_set():
            if const:
                samples = [s._replace(labels={**s.labels, **const}) for s in samples]
            group = old_groups.get(key)
            if group is None or group.samples != samples:
                before_group, group = group, _Group(key, samples)
                if before_group is not None and [(x.name, x.labels) for x in samples] == [
                    (x.name, x.labels) for x in before_group.samples
                ]:
                    group.prefixes = before_group.prefixes  # only values moved: the line prefixes hold
            else:
                group.inputs, group.values, group.stamps, group.plan = [], [], [], None
            family.groups[key] = group
        return family

    def _index(self, family: _Family) -> bool:
        """Record each label set's inputs and their current values; False if a label set would newly appear."""
        groups = family.groups
        for group in groups.values():
            group.inputs, group.values, group.stamps = [], [], []
        unpack = fileformat.unpack_value
        summed = True
        for file in self._files.values():
            entries = file.families.get(family.name)
            if not entries:
                continue
            info, rows, data, offsets, slots = file.info, file.rows, file.data, file.offsets, file.slots
            summed = summed and is_summed(info)
            for i in entries:
                group = groups.get(group_key(info, rows[i][2])[0])
                if group is None:  # only a mostrecent gauge without a timestamp has no label set yet
                    return False
                value, ts = unpack(data, offsets[i])
                slots[i] = (group, len(group.inputs))
                group.inputs.append((file, i))
                group.values.append(value)
                group.stamps.append(ts)
        for group in groups.values():
            if summed:
                inputs = [(f.info, f.rows[i][1], f.rows[i][2]) for f, i in group.inputs]
                plan = SummedLabelSet(family.name, inputs)
                # the plan lays samples out as the merge did; anything else is merged the general way
                same = [n for n, _ in plan.keys] == [sample.name for sample in group.samples]
                group.plan = plan if same else None
        family.indexed = True
        return True

    def _apply(self, changed: list[tuple[_File, int]], merged: set[str]) -> None:
        """Merge again the label sets whose inputs' values moved (whole families where that is exact or cheaper)."""
        dirty: dict[str, set[_Group]] = {}
        unpack = fileformat.unpack_value
        for file, i in changed:
            name = file.rows[i][0]
            family = self._families.get(name)
            if name in merged or family is None:
                continue  # merged whole this update, from the current bytes
            if family.by_value or (not family.indexed and not self._index(family)):
                self._families[name] = self._merge_family(name, family)
                merged.add(name)
                continue
            group, at = file.slots[i]
            group.values[at], group.stamps[at] = unpack(file.data, file.offsets[i])
            dirty.setdefault(name, set()).add(group)
        for name, groups in dirty.items():
            if name in merged:
                continue
            family = self._families[name]
            for group in groups:
                self._merge_group(family, group)

    def _merge_group(self, family: _Family, group: _Group) -> None:
        """Merge one label set again from its inputs' values; drop its rendered lines if a value changed."""
        if group.plan is not None:
            values = group.plan.values(group.values, group.stamps)
            if values != [s.value for s in group.samples]:
                group.samples = [Sample(s.name, s.labels, v) for s, v in zip(group.samples, values, strict=True)]
                group.lines = {}
            return
        merged = FamilyMerge(Metric(family.name, family.help, family.kind))
        for (file, i), value, ts in zip(group.inputs, group.values, group.stamps, strict=True):
            row = file.rows[i]
            merged.add(file.info, row[1], row[2], value, ts)
        samples = [s for _, found in merged.finish_by_label_set() for s in found]
        if self.const_labels:
            samples = [s._replace(labels={**s.labels, **self.const_labels}) for s in samples]
        if samples != group.samples:
            if [(x.name, x.labels) for x in samples] != [(x.name, x.labels) for x in group.samples]:
                group.prefixes = {}
            group.samples = samples
            group.lines = {}

    def metrics(self, extra: Mapping[str, float] | None = None) -> list[Metric]:
        """The merged metrics, new objects each call; `extra` adds to every sample of the families it names."""
        result = []
        for family in self._families.values():
            samples = [s for group in family.groups.values() for s in group.samples]
            delta = (extra or {}).get(family.name)
            if delta:
                samples = [s._replace(value=s.value + delta) for s in samples]
            result.append(family.metric(samples))
        return result

    def render(
        self,
        encoder: Encoder,
        fmt: str,
        names: Collection[str] | None = None,
        extra: Mapping[str, float] | None = None,
        exemplars: Mapping[tuple, Exemplar] | None = None,
    ) -> str:
        """The merged metrics as `encoder` formats them (no ``# EOF``), from cached lines where they are current.

        `fmt` names the format (its content type): lines are cached per format;
        None formats without caching (a format the caller will not bound).
        `names` keeps only samples of those names, as prometheus-client's
        ``name[]`` filter does; `extra` adds to every sample of the families it
        names (rendered, not cached); `exemplars` (OpenMetrics only) are
        appended to the bucket lines they belong to, keyed as
        ``promfork.writer.exemplars.read_exemplars`` keys them.
        """
        parts: list[str] = []
        patches = self._exemplar_samples(exemplars) if exemplars else {}
        for family in self._families.values():
            if fmt is None or names is not None or (extra and family.name in extra):
                parts += self._render_uncached(encoder, family, names, (extra or {}).get(family.name, 0.0), patches)
                continue
            header = family.headers.get(fmt)
            if header is None:
                header = family.headers[fmt] = "".join(_encode(encoder, family.metric([])))
            stale = [g for g in family.groups.values() if fmt not in g.lines]
            if stale and not self._render_groups(encoder, fmt, family, stale, header):
                parts += self._render_uncached(encoder, family, None, 0.0, patches)
                continue
            parts.append(header)
            if family.name in patches:
                parts += self._patched(encoder, fmt, family, patches[family.name])
            else:
                parts += [g.lines[fmt] for g in family.groups.values()]
        return "".join(parts)

    @staticmethod
    def _render_groups(encoder: Encoder, fmt: str, family: _Family, groups: list[_Group], header: str) -> bool:
        """Format the samples of `groups` and cache each group's lines; False if the encoder's lines do not split.

        A label set whose sample keys are unchanged since the encoder last
        formatted them only needs its values formatted (``floatToGoString``,
        what both encoders write for a value) after the cached line prefixes.
        The rest go through the encoder, in one call.
        """
        fresh = []
        for group in groups:
            prefixes = group.prefixes.get(fmt)
            if prefixes is None:
                fresh.append(group)
                continue
            group.lines[fmt] = "".join(
                [f"{prefix}{floatToGoString(s.value)}\n" for prefix, s in zip(prefixes, group.samples, strict=True)]
            )
        if not fresh:
            return True
        lines = _encode(encoder, family.metric([s for g in fresh for s in g.samples]))
        skip = header.count("\n")
        if len(lines) != skip + sum(len(g.samples) for g in fresh):  # an encoder that moves samples (_created)
            return False
        pos = skip
        for group in fresh:
            end = pos + len(group.samples)
            mine = lines[pos:end]
            group.lines[fmt] = "".join(mine)
            # Both encoders end a sample line with " " + floatToGoString(value) (then a timestamp or an
            # exemplar, which these samples never carry): the prefix is the line up to its last space.
            plain = all(x.timestamp is None and x.exemplar is None for x in group.samples)
            group.prefixes[fmt] = [line.rpartition(" ")[0] + " " for line in mine] if plain else None
            pos = end
        return True

    def _exemplar_samples(self, exemplars: Mapping[tuple, Exemplar]) -> dict[str, dict[_Group, dict[int, Sample]]]:
        """family name -> label set -> sample index -> that bucket sample carrying its exemplar."""
        found: dict[str, dict[_Group, dict[int, Sample]]] = {}
        for (name, labels), exemplar in exemplars.items():
            family = self._families.get(name.removesuffix("_bucket"))
            if family is None or not name.endswith("_bucket") or family.kind != "histogram":
                continue
            bound = dict(labels).get("le")
            group = family.groups.get(tuple(pair for pair in labels if pair[0] != "le"))
            if group is None or bound is None:
                continue
            for i, sample in enumerate(group.samples):
                if sample.name == name and sample.labels.get("le") == bound:
                    found.setdefault(family.name, {}).setdefault(group, {})[i] = sample._replace(exemplar=exemplar)
                    break
        return found

    def _patched(self, encoder: Encoder, fmt: str, family: _Family, patches: dict[_Group, dict[int, Sample]]):
        """The family's lines with exemplars appended to the patched bucket lines (formatted in one call)."""
        order = [(group, i) for group, by_index in patches.items() for i in by_index]
        rendered = _encode(encoder, family.metric([patches[g][i] for g, i in order]))
        rendered = rendered[len(rendered) - len(order) :]
        fixed: dict[_Group, list[str]] = {}
        for (group, i), line in zip(order, rendered, strict=True):
            lines = fixed.get(group)
            if lines is None:
                lines = fixed[group] = group.lines[fmt].splitlines(keepends=True)
            lines[i] = line
        return ["".join(fixed[g]) if g in fixed else g.lines[fmt] for g in family.groups.values()]

    @staticmethod
    def _render_uncached(encoder: Encoder, family: _Family, names, delta: float, patches) -> list[str]:
        samples = []
        by_group = patches.get(family.name, {})
        for group in family.groups.values():
            patched = by_group.get(group, {})
            for i, sample in enumerate(group.samples):
                if names is not None and sample.name not in names:
                    continue
                sample = patched.get(i, sample)
                samples.append(sample._replace(value=sample.value + delta) if delta else sample)
        if not samples:
            return []
        return _encode(encoder, family.metric(samples))

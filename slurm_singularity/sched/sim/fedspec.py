"""What a simulated federation is: its clusters, their GPUs, and the links between them.

Issue 16 asks the simulator to compare routing and migration policies over a
federation of Slurm clusters, and a migration costs what its checkpoint takes
to cross the link between two clusters. This module holds only the value
(``FederationSpec``) and its two spellings, a TOML file and a one-line CLI
string, both validated so that a bad spec is refused with the field named
(``FedSpecError``), never half-used. The simulation itself is
``federation.py``.

CLI string: ``NAME:GPUS[@REGION][,NAME:GPUS[@REGION]...][;KEY=VALUE...]``
with keys ``intra`` and ``inter`` (Gbit/s within and between regions),
``gpus_per_node`` and ``A-B`` (Gbit/s of one pair, overriding the rule),
e.g. ``east:16000@us,west:12000@us,tokyo:8000@ap;intra=100;inter=10``.

TOML::

    intra_region_gbps = 100.0
    inter_region_gbps = 10.0
    gpus_per_node = 8
    [clusters.east]
    gpus = 16000
    region = "us"
    [[links]]
    a = "east"
    b = "tokyo"
    gbps = 25.0
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..api import SchedError
from .trace import MAX_GPUS

#: Fewest and most clusters of one federation (a site with one cluster needs
#: no federation; 1,000 is far above any real grid's count).
MIN_CLUSTERS, MAX_CLUSTERS = 2, 1000
#: Bounds of a link's bandwidth, Gbit/s (a modem to a terabit backbone).
MIN_GBPS, MAX_GBPS = 1e-3, 1e6
#: Most GPUs per simulated node (as ``run.MAX_GPUS_PER_NODE``).
MAX_GPUS_PER_NODE = 128
#: Default bandwidths, Gbit/s. ASSUMPTION: one 100 Gbit/s data-centre link
#: between clusters of a region; 10 Gbit/s of a shared WAN path between regions.
INTRA_REGION_GBPS = 100.0
INTER_REGION_GBPS = 10.0

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,39}\Z")


class FedSpecError(SchedError):
    """A federation spec is malformed; the message names the field."""


@dataclass(frozen=True)
class ClusterSpec:
    """One member cluster."""

    #: Cluster name: a letter, then letters, digits or ``_`` (at most 40).
    name: str
    #: GPUs of the cluster, whole, 1 to 100,000 (``trace.MAX_GPUS``).
    gpus: int
    #: Region the cluster lies in; links within one region are faster.
    region: str = "default"

    def __post_init__(self) -> None:
        where = f"clusters.{self.name}" if isinstance(self.name, str) else "clusters"
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise FedSpecError(f"{where}: name: must be a letter then letters, digits or _ "
                               f"(at most 40), got {self.name!r}")
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) \
                or not 1 <= self.gpus <= MAX_GPUS:
            raise FedSpecError(f"{where}.gpus: must be a whole number in [1, {MAX_GPUS}], "
                               f"got {self.gpus!r}")
        if not isinstance(self.region, str) or not _NAME.match(self.region):
            raise FedSpecError(f"{where}.region: must be a letter then letters, digits or _, "
                               f"got {self.region!r}")


def _gbps(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not MIN_GBPS <= value <= MAX_GBPS:
        raise FedSpecError(f"{where}: must be a number of Gbit/s in [{MIN_GBPS:g}, {MAX_GBPS:g}], "
                           f"got {value!r}")
    return float(value)


@dataclass(frozen=True)
class FederationSpec:
    """Clusters and the bandwidth between each pair. Validated in ``__post_init__``."""

    clusters: tuple[ClusterSpec, ...]
    #: Gbit/s between two clusters of one region (default 100).
    intra_region_gbps: float = INTRA_REGION_GBPS
    #: Gbit/s between two clusters of different regions (default 10).
    inter_region_gbps: float = INTER_REGION_GBPS
    #: Per-pair overrides, Gbit/s: ``((a, b), gbps)``, either direction.
    links: tuple[tuple[tuple[str, str], float], ...] = ()
    #: GPUs per node in every cluster, 1 to 128 (default 8).
    gpus_per_node: int = 8
    _pairs: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.clusters, tuple) or not all(
                isinstance(c, ClusterSpec) for c in self.clusters):
            raise FedSpecError("clusters: must be a tuple of ClusterSpec")
        if not MIN_CLUSTERS <= len(self.clusters) <= MAX_CLUSTERS:
            raise FedSpecError(f"clusters: a federation has {MIN_CLUSTERS} to {MAX_CLUSTERS} "
                               f"clusters, got {len(self.clusters)}")
        names = [c.name for c in self.clusters]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise FedSpecError(f"clusters.{dup[0]}: named twice")
        _gbps("intra_region_gbps", self.intra_region_gbps)
        _gbps("inter_region_gbps", self.inter_region_gbps)
        g = self.gpus_per_node
        if isinstance(g, bool) or not isinstance(g, int) or not 1 <= g <= MAX_GPUS_PER_NODE:
            raise FedSpecError(f"gpus_per_node: must be a whole number in "
                               f"[1, {MAX_GPUS_PER_NODE}], got {g!r}")
        index = {n: k for k, n in enumerate(names)}
        for (a, b), gbps in self.links:
            for end in (a, b):
                if end not in index:
                    raise FedSpecError(f"links.{a}-{b}: unknown cluster {end!r} "
                                       f"(clusters: {', '.join(names)})")
            if a == b:
                raise FedSpecError(f"links.{a}-{b}: a link joins two different clusters")
            self._pairs[frozenset((index[a], index[b]))] = _gbps(f"links.{a}-{b}.gbps", gbps)

    @property
    def total_gpus(self) -> int:
        return sum(c.gpus for c in self.clusters)

    def gbps(self, a: int, b: int) -> float:
        """Bandwidth between clusters ``a`` and ``b`` (indexes), Gbit/s."""
        got = self._pairs.get(frozenset((a, b)))
        if got is not None:
            return got
        same = self.clusters[a].region == self.clusters[b].region
        return self.intra_region_gbps if same else self.inter_region_gbps

    def transfer_s(self, a: int, b: int, state_bytes: float) -> float:
        """Seconds to copy ``state_bytes`` from cluster ``a`` to ``b`` (0 within one cluster)."""
        if a == b:
            return 0.0
        return state_bytes * 8.0 / (self.gbps(a, b) * 1e9)

    def describe(self) -> str:
        parts = [f"{c.name}:{c.gpus}@{c.region}" for c in self.clusters]
        return (f"{len(self.clusters)} clusters, {self.total_gpus} GPUs ({', '.join(parts)}); "
                f"{self.intra_region_gbps:g} Gbit/s within a region, "
                f"{self.inter_region_gbps:g} between regions")


def uniform(count: int, total_gpus: int, regions: int = 1, **kw: Any) -> FederationSpec:
    """``count`` clusters ``c0..`` sharing ``total_gpus`` as evenly as whole nodes allow,
    spread round-robin over ``regions`` regions ``r0..``."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise FedSpecError(f"clusters: must be a whole number >= 1, got {count!r}")
    base, extra = divmod(total_gpus, count)
    return FederationSpec(tuple(ClusterSpec(f"c{k}", base + (k < extra), f"r{k % regions}")
                                for k in range(count)), **kw)


def parse_federation(text: str) -> FederationSpec:
    """The spec of a CLI string (module docstring).

    :raises FedSpecError: naming the part of the string that is wrong.
    """
    if not isinstance(text, str) or not text.strip():
        raise FedSpecError("--federation: empty (expected NAME:GPUS[@REGION],...[;KEY=VALUE])")
    head, *options = [p.strip() for p in text.split(";")]
    clusters = []
    for part in head.split(","):
        name, sep, rest = part.strip().partition(":")
        gpus, _, region = rest.partition("@")
        if not sep or not gpus.strip():
            raise FedSpecError(f"--federation: cluster {part.strip()!r}: expected NAME:GPUS[@REGION]")
        try:
            count = int(gpus)
        except ValueError:
            raise FedSpecError(f"clusters.{name}.gpus: not a whole number: {gpus!r}") from None
        clusters.append(ClusterSpec(name.strip(), count, region.strip() or "default"))
    kw: dict[str, Any] = {}
    links = []
    for opt in options:
        key, sep, value = opt.partition("=")
        key = key.strip()
        if not sep:
            raise FedSpecError(f"--federation: option {opt!r}: expected KEY=VALUE")
        if key == "gpus_per_node":
            try:
                kw["gpus_per_node"] = int(value)
            except ValueError:
                raise FedSpecError(f"gpus_per_node: not a whole number: {value!r}") from None
            continue
        try:
            number = float(value)
        except ValueError:
            raise FedSpecError(f"--federation: {key}: not a number: {value!r}") from None
        if key == "intra":
            kw["intra_region_gbps"] = number
        elif key == "inter":
            kw["inter_region_gbps"] = number
        elif "-" in key:
            a, _, b = key.partition("-")
            links.append(((a, b), number))
        else:
            raise FedSpecError(f"--federation: unknown option {key!r} "
                               f"(expected intra, inter, gpus_per_node or A-B)")
    return FederationSpec(tuple(clusters), links=tuple(links), **kw)


_TOP_KEYS = {"intra_region_gbps", "inter_region_gbps", "gpus_per_node", "clusters", "links"}


def federation_from_mapping(data: Mapping[str, Any], where: str = "federation") -> FederationSpec:
    """The spec of a parsed TOML document; an unknown key is an error.

    :raises FedSpecError: naming the key.
    """
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise FedSpecError(f"{where}: unknown key {unknown[0]!r} (expected {', '.join(sorted(_TOP_KEYS))})")
    table = data.get("clusters")
    if not isinstance(table, Mapping) or not table:
        raise FedSpecError(f"{where}: clusters: missing or not a table of clusters")
    clusters = []
    for name, body in table.items():
        if not isinstance(body, Mapping):
            raise FedSpecError(f"{where}: clusters.{name}: not a table")
        extra = sorted(set(body) - {"gpus", "region"})
        if extra:
            raise FedSpecError(f"{where}: clusters.{name}: unknown key {extra[0]!r} "
                               f"(expected gpus, region)")
        if "gpus" not in body:
            raise FedSpecError(f"{where}: clusters.{name}.gpus: missing")
        clusters.append(ClusterSpec(name, body["gpus"], body.get("region", "default")))
    links = []
    raw_links = data.get("links", [])
    if not isinstance(raw_links, list):
        raise FedSpecError(f"{where}: links: must be an array of tables")
    for k, link in enumerate(raw_links):
        if not isinstance(link, Mapping) or set(link) != {"a", "b", "gbps"}:
            raise FedSpecError(f"{where}: links[{k}]: must have exactly a, b and gbps")
        links.append(((str(link["a"]), str(link["b"])), link["gbps"]))
    kw = {k: data[k] for k in ("intra_region_gbps", "inter_region_gbps", "gpus_per_node")
          if k in data}
    return FederationSpec(tuple(clusters), links=tuple(links), **kw)


def load_federation(path: str | Path) -> FederationSpec:
    """The spec of a TOML file.

    :raises FedSpecError: the file cannot be read or parsed, or a field is wrong
        (the message starts with the file's name).
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise FedSpecError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise FedSpecError(f"{path}: not TOML: {exc}") from None
    try:
        return federation_from_mapping(data, str(path))
    except FedSpecError as exc:
        msg = str(exc)
        raise FedSpecError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None


def read_federation(text: str) -> FederationSpec:
    """A spec from a path to a ``.toml`` file or from a CLI string."""
    if text.endswith(".toml"):
        return load_federation(text)
    return parse_federation(text)

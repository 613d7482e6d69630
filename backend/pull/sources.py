"""What a pull source names, and the files it stands for.

Sources:
- an http(s) URL of a `.gguf` file;
- `hf://owner/repo/path/file.gguf`: one file of a Hugging Face repository;
- `hf://owner/repo:QUANT` (and ollama's spelling `hf.co/owner/repo:QUANT`): the repository's
  GGUF of that quantization, found in its file list; without a quantization, Q4_K_M, or the
  repository's only GGUF.

A split GGUF (`name-00001-of-00003.gguf`) always comes as its whole set, whichever shard was
named. Hugging Face files map to resolve URLs on `$HF_ENDPOINT` (a mirror; default
huggingface.co), and `$HF_TOKEN` goes with requests to that host only (httpx drops it on a
redirect to another host, such as the CDN).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from urllib.parse import quote, unquote, urlsplit

import httpx

from ..errors import PullError, PullForbidden, PullNotFound, PullSourceInvalid

HF_ENDPOINT = "https://huggingface.co"
DEFAULT_QUANT = "Q4_K_M"  # what ollama takes for hf.co/owner/repo without a tag
SHARD = re.compile(r"^(?P<base>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
# A quantization in a file name: Q4_K_M, IQ3_XXS, Q8_0, TQ1_0, Q4_K_XL, BF16, F16, F32, MXFP4 —
# a whole token, so Q4_K never matches Q4_K_M and Q4_XS never matches IQ4_XS.
QUANT = re.compile(r"(?<![A-Za-z0-9])((?:I?Q|TQ)\d(?:_(?:\d+|K|S|M|L|XS|XXS|XL|NL))*|BF16|F16|F32|MXFP4)"
                   r"(?![A-Za-z0-9])", re.IGNORECASE)
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HUB_PREFIXES = ("hf://", "hf.co/", "huggingface.co/")


@dataclass(frozen=True)
class Hub:
    """The Hugging Face endpoint and token of this process's environment."""

    endpoint: str = HF_ENDPOINT
    token: str | None = None

    @classmethod
    def from_env(cls) -> Hub:
        return cls(os.environ.get("HF_ENDPOINT", "").rstrip("/") or HF_ENDPOINT, os.environ.get("HF_TOKEN") or None)

    def serves(self, url: str) -> bool:
        return urlsplit(url).netloc == urlsplit(self.endpoint).netloc

    def headers(self, url: str) -> dict[str, str]:
        """The bearer token, for requests to the hub's own host only."""
        return {"Authorization": f"Bearer {self.token}"} if self.token and self.serves(url) else {}

    def resolve_url(self, repo: str, path: str) -> str:
        return f"{self.endpoint}/{repo}/resolve/main/{quote(path)}"


@dataclass(frozen=True)
class RemoteFile:
    """One file to download: where from, its name on disk, and what the source says of it."""

    url: str
    name: str
    size: int | None = None
    sha256: str | None = None
    hub: bool = False  # served by the hub: its ETag is the file's sha256
    validator: str | None = None  # the host's (linked) ETag or Last-Modified: which version of the file


@dataclass(frozen=True)
class Source:
    """A parsed source: a URL, or a repository with a file path or a quantization."""

    text: str  # normalised: ollama's hf.co/… spelling becomes hf://…
    url: str | None = None
    repo: str | None = None  # owner/name
    path: str | None = None  # a file in the repository
    quant: str | None = None  # or a quantization to find in its file list

    @property
    def on_hub(self) -> bool:
        return self.repo is not None


def parse_source(text: str) -> Source:
    """Read a source; PullSourceInvalid says what corral accepts when `text` is none of it."""
    given = text.strip()
    lowered = given.lower()
    if lowered.startswith(("http://", "https://")):
        return _url_source(given)
    for prefix in _HUB_PREFIXES:
        if lowered.startswith(prefix):
            return _hub_source(given, given[len(prefix):])
    raise PullSourceInvalid(
        f"{given!r} is not a source corral can pull from: a name in ollama's library (such as llama3.2) cannot "
        "be pulled, as ollama's registry serves its own blob format, not GGUF files. Pull a GGUF from Hugging "
        "Face as hf://owner/repo:QUANT or hf.co/owner/repo:QUANT (for example "
        "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M) or hf://owner/repo/file.gguf, or from an https:// "
        "URL of a .gguf file")


def _url_source(url: str) -> Source:
    parts = urlsplit(url)
    if not parts.netloc:
        raise PullSourceInvalid(f"{url!r}: the URL has no host")
    if not unquote(parts.path).lower().endswith(".gguf"):
        raise PullSourceInvalid(f"{url!r}: the URL does not name a .gguf file; corral pulls GGUF model files "
                                "(for a Hugging Face repository, use hf://owner/repo:QUANT)")
    return Source(url, url=url)


def _hub_source(given: str, rest: str) -> Source:
    """`owner/repo/path/file.gguf`, or `owner/repo[:QUANT]` (ollama's `hf.co/owner/repo:QUANT`)."""
    rest = rest.strip("/")
    if rest.lower().endswith(".gguf"):
        owner, _, after = rest.partition("/")
        name, _, path = after.partition("/")
        repo = f"{owner}/{name}"
        _check_repo(given, repo)
        if not path:
            raise PullSourceInvalid(f"{given!r}: name a file in the repository: hf://owner/repo/file.gguf")
        return Source(f"hf://{repo}/{path}", repo=repo, path=path)
    repo, _, tag = rest.partition(":")
    _check_repo(given, repo)
    quant = "" if tag.lower() in ("", "latest") else tag
    if quant and not QUANT.fullmatch(quant):
        raise PullSourceInvalid(f"{given!r}: {quant!r} is not a quantization (such as Q4_K_M, Q8_0, IQ3_XXS, F16)")
    return Source(f"hf://{repo}" + (f":{quant.upper()}" if quant else ""), repo=repo, quant=quant.upper() or None)


def _check_repo(given: str, repo: str) -> None:
    parts = repo.split("/")
    if len(parts) != 2 or not all(_REPO_PART.fullmatch(p) for p in parts):
        raise PullSourceInvalid(f"{given!r}: a Hugging Face repository is owner/name, as in "
                                "hf://bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M")


async def files_of(source: Source, client: httpx.AsyncClient, hub: Hub) -> list[RemoteFile]:
    """The files `source` stands for, in shard order, with the sizes and hashes the hub lists."""
    if source.url is not None:
        name = unquote(urlsplit(source.url).path.rsplit("/", 1)[-1])
        return shard_set(RemoteFile(source.url, name, hub=hub.serves(source.url)))
    assert source.repo is not None
    if source.path is not None:
        name = source.path.rsplit("/", 1)[-1]
        return shard_set(RemoteFile(hub.resolve_url(source.repo, source.path), name, hub=True))
    return await _quantization(source, client, hub)


def shard_set(file: RemoteFile) -> list[RemoteFile]:
    """A split GGUF's every shard (its URLs differ only in the index); any other file alone."""
    shard = SHARD.match(file.name)
    if shard is None:
        return [file]
    head, _, _ = file.url.rpartition("/")
    names = [f"{shard['base']}-{i:05d}-of-{shard['count']}.gguf" for i in range(1, int(shard["count"]) + 1)]
    return [replace(file, url=f"{head}/{quote(name)}", name=name, size=None, sha256=None) if name != file.name
            else file for name in names]


async def _quantization(source: Source, client: httpx.AsyncClient, hub: Hub) -> list[RemoteFile]:
    """The one model in the repository's file list that has the asked quantization."""
    assert source.repo is not None
    listing = await _listing(source.repo, client, hub)
    models = _models(listing)
    if not models:
        raise PullNotFound(f"{source.repo} on {hub.endpoint} has no GGUF files; name a GGUF repository "
                           "(their names usually end in -GGUF)")
    quant = source.quant
    if quant is None:
        quant = DEFAULT_QUANT if any(_quant_of(m[0][0]) == DEFAULT_QUANT for m in models) or len(models) > 1 else None
    chosen = [m for m in models if quant is None or _quant_of(m[0][0]) == quant]
    if len(chosen) != 1:
        shown = "; ".join(_label(m) for m in models)
        if not chosen:
            have = sorted({q for m in models if (q := _quant_of(m[0][0]))})
            raise PullNotFound(f"{source.repo} has no {quant} file; it has {', '.join(have) or 'no named quantization'}"
                               f" ({shown}); pull hf://{source.repo}:QUANT with one of them")
        raise PullSourceInvalid(f"{source.repo}: {quant} matches {len(chosen)} models "
                                f"({'; '.join(_label(m) for m in chosen)}); name one as hf://{source.repo}/FILE")
    return [RemoteFile(hub.resolve_url(source.repo, path), path.rsplit("/", 1)[-1], size, sha, hub=True)
            for path, size, sha in chosen[0]]


async def _listing(repo: str, client: httpx.AsyncClient, hub: Hub) -> list[tuple[str, int | None, str | None]]:
    """(path, size, sha256) of every file in the repository, from the hub's model API."""
    url = f"{hub.endpoint}/api/models/{repo}"
    try:
        response = await client.get(url, params={"blobs": "true"}, headers=hub.headers(url))
    except httpx.HTTPError as exc:
        raise PullError(f"cannot reach {hub.endpoint} for the file list of {repo}: {exc or type(exc).__name__}; "
                        "check the network (or $HF_ENDPOINT)") from exc
    if response.status_code in (401, 403):
        raise PullForbidden(f"{hub.endpoint} refused the file list of {repo} (HTTP {response.status_code}): "
                            "the repository is private, gated or does not exist; set HF_TOKEN to a token that "
                            "can read it, and accept the model's licence on its page")
    if response.status_code == 404:
        raise PullNotFound(f"{hub.endpoint} has no repository {repo} (HTTP 404); check the owner and name")
    if response.is_error:
        raise PullError(f"{hub.endpoint} answered HTTP {response.status_code} for the file list of {repo}")
    try:
        siblings = response.json()["siblings"]
        return [(s["rfilename"], _int(s.get("size") or (s.get("lfs") or {}).get("size")),
                 (s.get("lfs") or {}).get("sha256")) for s in siblings]
    except (ValueError, KeyError, TypeError) as exc:
        raise PullError(f"{url} did not answer with a Hugging Face file list ({exc}); is $HF_ENDPOINT "
                        "a Hugging Face mirror?") from exc


Model = list[tuple[str, int | None, str | None]]  # a model's files in the listing: one, or a shard set


def _models(listing: list[tuple[str, int | None, str | None]]) -> list[Model]:
    """The listing's GGUF models: single files, and each split set as one (projector files of
    vision models are left out: they are not models)."""
    singles: list[Model] = []
    sets: dict[tuple[str, str, str], Model] = {}
    for path, size, sha in sorted(listing):
        folder, _, name = path.rpartition("/")
        if not name.lower().endswith(".gguf") or "mmproj" in name.lower():
            continue
        shard = SHARD.match(name)
        if shard is None:
            singles.append([(path, size, sha)])
        else:
            sets.setdefault((folder, shard["base"], shard["count"]), []).append((path, size, sha))
    return singles + list(sets.values())


def _quant_of(path: str) -> str | None:
    found = QUANT.findall(path.rsplit("/", 1)[-1])
    return found[-1].upper() if found else None


def _label(model: Model) -> str:
    return model[0][0] if len(model) == 1 else f"{model[0][0]} (+{len(model) - 1} shards)"


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None

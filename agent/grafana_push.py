"""``sentinel-agent grafana push``: put the llm-sentinel folder, dashboards and alert rules into a Grafana.

The files are those ``grafana/generate.py`` writes (``grafana/dashboards/*.json`` and the
alert rules of ``grafana/provisioning/alerting/sentinel.yml``), so a push and file provisioning
install the same objects. The push talks to Grafana's HTTP API through grafana-client (the
``grafana`` extra) and is idempotent: every object is read first, created when missing,
updated in place (same uid) when it differs and left alone when it is the same, so a second
push changes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2

#: The generated files in a source checkout (and an editable install).
CHECKOUT_DIR = Path(__file__).resolve().parents[1] / "grafana"
#: The same files in an installed wheel: pyproject.toml ships grafana/ as the package data of ``agent.grafana``.
INSTALLED_DIR = Path(__file__).resolve().parent / "grafana"
ALERTS_FILE = Path("provisioning/alerting/sentinel.yml")
PROVIDER_FILE = Path("provisioning/dashboards/sentinel.yml")
DEFAULT_FOLDER_UID = "llm-sentinel"

DESCRIPTION = "Grafana integration: push the llm-sentinel dashboards and alert rules to a Grafana server."

PUSH_DESCRIPTION = (
    "Create or update, through Grafana's HTTP API, the llm-sentinel folder (or use the folder titled 'LLM "
    "Sentinel' that file provisioning made), the dashboards of DIR/dashboards "
    "and the Grafana-managed alert rules of DIR/provisioning/alerting/sentinel.yml. Objects keep their uids: "
    "a missing one is created, a different one is updated in place, an identical one is left alone, so "
    "pushing twice changes nothing. The token needs the Editor role (dashboards) and alert-rule write "
    "permission (Admin, or a service account with alerting.provisioning:write). Needs the 'grafana' extra: "
    "pip install 'llm-sentinel[grafana]'."
)

PUSH_EPILOG = """\
environment:
  GRAFANA_URL     default for --url
  GRAFANA_TOKEN   default for --token

exit codes:
  0  pushed (each object reported as created, updated or unchanged)
  1  Grafana unreachable, token refused (401/403), or an API error
  2  usage error: no URL or token, a bad URL, files missing, the grafana extra not installed
"""


class PushError(Exception):
    """A push that cannot go on; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_RUNTIME):
        super().__init__(message)
        self.code = code


@dataclass
class Bundle:
    """What a push installs, read from the generated files."""

    folder_uid: str
    folder_title: str
    group: str
    group_interval_seconds: int
    dashboards: list[dict[str, Any]]
    rules: list[dict[str, Any]]


def _duration_seconds(text: str) -> int:
    match = re.fullmatch(r"(\d+)([smh])", str(text).strip())
    if not match:
        raise PushError(f"rule group interval {text!r} is not a duration like 1m, 30s or 1h", EXIT_USAGE)
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2)]


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PushError(
            f"cannot read {path}: {exc.strerror or exc} (run python grafana/generate.py)", EXIT_USAGE
        ) from exc
    except yaml.YAMLError as exc:
        raise PushError(f"{path} is not valid YAML: {exc}", EXIT_USAGE) from exc
    if not isinstance(data, dict):
        raise PushError(f"{path} does not hold a YAML mapping", EXIT_USAGE)
    return data


def load_bundle(directory: Path) -> Bundle:
    """Dashboards and alert rules (in the HTTP API's shape) from a folder laid out like grafana/."""
    if not (directory / "dashboards").is_dir():
        raise PushError(
            f"{directory} has no dashboards/ folder: give --dir the grafana/ folder of an llm-sentinel checkout",
            EXIT_USAGE,
        )
    folder_uid = DEFAULT_FOLDER_UID
    provider_path = directory / PROVIDER_FILE
    if provider_path.is_file():
        providers = _read_yaml(provider_path).get("providers") or [{}]
        folder_uid = providers[0].get("folderUid") or folder_uid
    alerts = _read_yaml(directory / ALERTS_FILE)
    groups = alerts.get("groups") or []
    if len(groups) != 1 or not isinstance(groups[0], dict):
        raise PushError(f"{directory / ALERTS_FILE}: expected exactly one rule group", EXIT_USAGE)
    group = groups[0]
    try:
        name, title, org = group["name"], group["folder"], int(group.get("orgId", 1))
        rules = [
            {**rule, "folderUID": folder_uid, "ruleGroup": name, "orgID": org} for rule in group.get("rules") or []
        ]
        interval = _duration_seconds(group.get("interval", "1m"))
    except (KeyError, TypeError, ValueError) as exc:
        raise PushError(f"{directory / ALERTS_FILE}: malformed rule group ({exc!r})", EXIT_USAGE) from exc
    missing_uid = [r.get("title", "?") for r in rules if not r.get("uid")]
    if missing_uid:
        raise PushError(f"{directory / ALERTS_FILE}: rules without a uid: {missing_uid}", EXIT_USAGE)
    dashboards = []
    for path in sorted((directory / "dashboards").glob("*.json")):
        try:
            board = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PushError(f"cannot read dashboard {path}: {exc}", EXIT_USAGE) from exc
        if not isinstance(board, dict) or not board.get("uid") or not board.get("title"):
            raise PushError(f"{path} is not a dashboard with a uid and a title", EXIT_USAGE)
        dashboards.append(board)
    if not dashboards:
        raise PushError(f"no dashboards in {directory / 'dashboards'} (run python grafana/generate.py)", EXIT_USAGE)
    return Bundle(folder_uid, title, name, interval, dashboards, rules)


def _subset(ours: Any, theirs: Any) -> bool:
    """Whether every field we set has the same value on the server (which adds fields of its own)."""
    if isinstance(ours, dict):
        return isinstance(theirs, dict) and all(k in theirs and _subset(v, theirs[k]) for k, v in ours.items())
    if isinstance(ours, list):
        return isinstance(theirs, list) and len(ours) == len(theirs) and all(map(_subset, ours, theirs))
    return ours == theirs


def _without(board: dict[str, Any], keys: tuple[str, ...] = ("id", "version")) -> dict[str, Any]:
    return {k: v for k, v in board.items() if k not in keys}


def _api_url(url: str) -> str:
    """``url`` with a path prefix that ends in '/' (grafana-client appends 'api' to it as is)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise PushError(f"--url {url!r} is not an http(s) URL such as http://grafana:3000", EXIT_USAGE)
    try:
        parsed.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise PushError(f"--url {url!r}: {exc}", EXIT_USAGE) from exc
    path = parsed.path if parsed.path.endswith("/") or not parsed.path else parsed.path + "/"
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, parsed.query, ""))


def _display_url(url: str) -> str:
    """``url`` without a user name or password, for messages."""
    parsed = urllib.parse.urlsplit(url)
    netloc = parsed.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path, "", ""))


class Pusher:
    """One Grafana connection; every call maps grafana-client's exceptions to a PushError a person can act on."""

    def __init__(self, url: str, token: str | None, timeout: float = 10.0):
        try:
            from grafana_client import GrafanaApi
            from grafana_client.client import GrafanaClientError, GrafanaException
        except ImportError as exc:
            raise PushError(
                f"the grafana extra is not installed ({exc}); install it with: pip install 'llm-sentinel[grafana]'",
                EXIT_USAGE,
            ) from exc
        self._client_error, self._grafana_error = GrafanaClientError, GrafanaException
        self.url = _display_url(url)
        self.api = GrafanaApi.from_url(_api_url(url), credential=token, timeout=timeout)
        self.counts = {"created": 0, "updated": 0, "unchanged": 0}

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, missing_ok: bool = False, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._client_error as exc:
            if missing_ok and exc.status_code == 404:
                return None
            if exc.status_code == 401:
                raise PushError(
                    f"Grafana at {self.url} refused the token (401 Unauthorized) while trying to {what}; "
                    "check --token / GRAFANA_TOKEN (a service-account token)"
                ) from exc
            if exc.status_code == 403:
                raise PushError(
                    f"the token may not {what} (403 Forbidden: {exc.message}); it needs the Editor role for "
                    "dashboards and folders, and alert-rule write permission for the rules"
                ) from exc
            raise PushError(f"cannot {what}: {exc.message}") from exc
        except self._grafana_error as exc:
            if not exc.status_code:  # a timeout or a transport error: no answer at all
                raise PushError(f"cannot reach Grafana at {self.url} ({exc.message})") from exc
            raise PushError(f"cannot {what}: Grafana at {self.url} answered: {exc.message}") from exc
        except OSError as exc:  # niquests' ConnectionError is an OSError
            raise PushError(f"cannot reach Grafana at {self.url} ({type(exc).__name__}: {exc})") from exc
        except ValueError as exc:  # an answer that is not JSON: not a Grafana API
            raise PushError(f"cannot {what}: {self.url} did not answer like Grafana's API ({exc})") from exc

    def _report(self, kind: str, name: str, outcome: str, out: Any) -> None:
        self.counts[outcome] += 1
        print(f"{kind:<10} {name}: {outcome}", file=out)

    def check(self, out: Any) -> None:
        info = self._call("read Grafana's build information", self.api.health.check) or {}
        print(f"Grafana {info.get('version', '(version unknown)')} at {self.url}", file=out)

    def folder(self, uid: str, title: str, out: Any) -> str:
        """The uid of the folder to use: ours, else one with our title, else ours created.

        File provisioning resolves the folder by title (the alerting provisioning cannot name a
        uid), so on a Grafana once provisioned from files the folder has a uid of Grafana's
        choosing; creating ours next to it would clash on the title.
        """
        existing = self._call(f"read folder {uid}", self.api.folder.get_folder, uid, missing_ok=True)
        if existing is None:
            folders = self._call("list folders", self.api.folder.get_all_folders) or []
            same_title = [f for f in folders if isinstance(f, dict) and f.get("title") == title and f.get("uid")]
            if same_title:
                self._report("folder", f"{title} (uid {same_title[0]['uid']})", "unchanged", out)
                return str(same_title[0]["uid"])
            self._call(f"create folder {uid}", self.api.folder.create_folder, title, uid=uid)
            self._report("folder", title, "created", out)
        elif existing.get("title") != title:
            self._call(
                f"update folder {uid}",
                self.api.folder.update_folder,
                uid,
                title=title,
                version=existing.get("version"),
                overwrite=True,
            )
            self._report("folder", title, "updated", out)
        else:
            self._report("folder", title, "unchanged", out)
        return uid

    def dashboard(self, board: dict[str, Any], folder_uid: str, out: Any) -> None:
        uid = board["uid"]
        existing = self._call(f"read dashboard {uid}", self.api.dashboard.get_dashboard, uid, missing_ok=True)
        if existing is not None:
            same = _without(existing.get("dashboard") or {}) == _without(board)
            if same and (existing.get("meta") or {}).get("folderUid") == folder_uid:
                self._report("dashboard", board["title"], "unchanged", out)
                return
        body = {
            "dashboard": _without(board),
            "folderUid": folder_uid,
            "overwrite": True,
            "message": "sentinel-agent grafana push",
        }
        self._call(f"save dashboard {uid}", self.api.dashboard.update_dashboard, body)
        self._report("dashboard", board["title"], "created" if existing is None else "updated", out)

    def rule(self, rule: dict[str, Any], out: Any) -> None:
        uid = rule["uid"]
        provisioning = self.api.alertingprovisioning
        existing = self._call(f"read alert rule {uid}", provisioning.get_alertrule, uid, missing_ok=True)
        if existing is None:
            self._call(f"create alert rule {uid}", provisioning.create_alertrule, rule)
            self._report("rule", rule["title"], "created", out)
        elif not _subset(rule, existing):
            self._call(f"update alert rule {uid}", provisioning.update_alertrule, uid, rule)
            self._report("rule", rule["title"], "updated", out)
        else:
            self._report("rule", rule["title"], "unchanged", out)

    def group_interval(self, folder_uid: str, group: str, seconds: int, out: Any) -> None:
        provisioning = self.api.alertingprovisioning
        what = f"read rule group {group}"
        current = self._call(what, provisioning.get_rule_group, folder_uid, group, missing_ok=True)
        if current is None or current.get("interval") == seconds:
            return
        body = {**current, "interval": seconds}
        self._call(f"set the interval of rule group {group}", provisioning.update_rule_group, folder_uid, group, body)
        self._report("group", f"{group} interval {seconds}s", "updated", out)

    def push(self, bundle: Bundle, out: Any = None) -> dict[str, int]:
        out = out or sys.stdout
        self.check(out)
        folder_uid = self.folder(bundle.folder_uid, bundle.folder_title, out)
        for board in bundle.dashboards:
            self.dashboard(board, folder_uid, out)
        for rule in bundle.rules:
            self.rule({**rule, "folderUID": folder_uid}, out)
        if bundle.rules:
            self.group_interval(folder_uid, bundle.group, bundle.group_interval_seconds, out)
        return dict(self.counts)


def add_parser(sub: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    """The ``grafana`` command and its ``push`` action, on the agent's command line."""
    grafana = sub.add_parser(
        "grafana",
        help="push dashboards and alert rules to Grafana",
        description=DESCRIPTION,
        epilog=PUSH_EPILOG,
        formatter_class=formatter,
    )
    actions = grafana.add_subparsers(dest="grafana_action", required=True, metavar="ACTION")
    push = actions.add_parser(
        "push",
        help="create or update the folder, dashboards and alert rules",
        description=textwrap.fill(PUSH_DESCRIPTION, 100),
        epilog=PUSH_EPILOG,
        formatter_class=formatter,
    )
    push.add_argument("--url", default=os.environ.get("GRAFANA_URL"), help="Grafana base URL, e.g. http://grafana:3000")
    token = push.add_mutually_exclusive_group()
    token.add_argument("--token", default=os.environ.get("GRAFANA_TOKEN"), help="service-account token (Bearer)")
    token.add_argument("--token-file", type=Path, metavar="PATH", help="read the token from this file")
    push.add_argument(
        "--dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder with dashboards/ and provisioning/ as grafana/generate.py writes them, e.g. the grafana/ "
        "folder of an llm-sentinel checkout. Default: that folder of the checkout this command runs from "
        f"({CHECKOUT_DIR}), else the copy an installed package carries ({INSTALLED_DIR})",
    )
    push.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds per HTTP request (default 10)")


def run_push(args: argparse.Namespace, out: Any = None) -> int:
    out = out or sys.stdout

    def fail(message: str, code: int) -> int:
        print(f"sentinel-agent: grafana push: {message}", file=sys.stderr)
        return code

    if not args.url:
        return fail("no Grafana URL: give --url or set GRAFANA_URL", EXIT_USAGE)
    token = args.token
    if args.token_file is not None:
        try:
            token = args.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            return fail(f"cannot read --token-file {args.token_file}: {exc.strerror or exc}", EXIT_USAGE)
    parsed = urllib.parse.urlsplit(args.url)
    if not token and not (parsed.username and parsed.password):
        return fail("no token: give --token, --token-file or set GRAFANA_TOKEN", EXIT_USAGE)
    if args.timeout <= 0:
        return fail(f"--timeout must be positive, got {args.timeout}", EXIT_USAGE)
    directory = args.dir
    if directory is None:
        directory = next((d for d in (CHECKOUT_DIR, INSTALLED_DIR) if (d / "dashboards").is_dir()), None)
        if directory is None:
            return fail(
                f"no --dir given, and there is no grafana/ folder at {CHECKOUT_DIR} nor at {INSTALLED_DIR} (a pip "
                "install of this version carries one): give --dir the grafana/ folder of an llm-sentinel checkout",
                EXIT_USAGE,
            )
    try:
        bundle = load_bundle(directory)
        counts = Pusher(args.url, token or None, timeout=args.timeout).push(bundle, out)
    except PushError as exc:
        return fail(str(exc), exc.code)
    print(f"{counts['created']} created, {counts['updated']} updated, {counts['unchanged']} unchanged", file=out)
    return EXIT_OK


def main(args: argparse.Namespace) -> int:
    if args.grafana_action == "push":
        return run_push(args)
    return EXIT_USAGE  # unreachable: argparse requires a known action

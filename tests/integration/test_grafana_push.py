"""``sentinel-agent grafana push`` against a small HTTP server on loopback.

**The server is not Grafana.** No Grafana can run in this test environment, so
``GrafanaDouble`` below implements, with http.server, only the endpoints that grafana-client
calls during a push (the paths of grafana_client/elements/{health,folder,dashboard,
alerting_provisioning}.py), with Grafana's status codes for a missing object (404), a bad
token (401) and a forbidden write (403), and with server-side fields added to stored objects
(ids, versions, query defaults) as Grafana adds them. It checks what the push sends and what
it does on a second run; it cannot prove that a real Grafana accepts every field.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from agent import cli

ROOT = Path(__file__).resolve().parents[2]
GRAFANA_DIR = ROOT / "grafana"
TOKEN = "glsa_test_token"


class GrafanaDouble(ThreadingHTTPServer):
    """Folders, dashboards, alert rules and rule groups in dicts; every request logged as (method, path)."""

    daemon_threads = True

    def __init__(self, prefix: str = "", token: str = TOKEN, read_only_token: str | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.prefix, self.token, self.read_only_token = prefix, token, read_only_token
        self.folders: dict[str, dict] = {}
        self.dashboards: dict[str, dict] = {}
        self.rules: dict[str, dict] = {}
        self.groups: dict[tuple[str, str], int] = {}
        self.log: list[tuple[str, str]] = []
        self.next_id = 1
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{self.prefix}"

    def writes(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p in self.log if m != "GET"]

    def __enter__(self) -> GrafanaDouble:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: GrafanaDouble

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict:
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")

    def _handle(self, method: str) -> None:
        srv = self.server
        body = self._body() if method in ("POST", "PUT") else None
        if not self.path.startswith(srv.prefix + "/api/"):
            return self._send(404, {"message": "not found"})
        path = self.path[len(srv.prefix) + len("/api") :].split("?")[0]
        srv.log.append((method, path))
        auth = self.headers.get("Authorization", "")
        if auth not in (f"Bearer {srv.token}", f"Bearer {srv.read_only_token}"):
            return self._send(401, {"message": "invalid API key"})
        if method != "GET" and auth == f"Bearer {srv.read_only_token}":
            return self._send(403, {"message": "You'll need additional permissions to perform this action."})
        routes = [
            ("GET", r"/frontend/settings", lambda: (200, {"buildInfo": {"version": "0.0.0-test-double"}})),
            (
                "GET",
                r"/folders",
                lambda: (200, [{k: f[k] for k in ("id", "uid", "title")} for f in srv.folders.values()]),
            ),
            ("GET", r"/folders/([^/]+)", self._get_folder),
            ("POST", r"/folders", lambda: self._create_folder(body)),
            ("PUT", r"/folders/([^/]+)", lambda uid: self._update_folder(uid, body)),
            ("GET", r"/dashboards/uid/([^/]+)", self._get_dashboard),
            ("POST", r"/dashboards/db", lambda: self._save_dashboard(body)),
            ("GET", r"/v1/provisioning/alert-rules/([^/]+)", self._get_rule),
            ("POST", r"/v1/provisioning/alert-rules", lambda: self._save_rule(None, body)),
            ("PUT", r"/v1/provisioning/alert-rules/([^/]+)", lambda uid: self._save_rule(uid, body)),
            ("GET", r"/v1/provisioning/folder/([^/]+)/rule-groups/([^/]+)", self._get_group),
            ("PUT", r"/v1/provisioning/folder/([^/]+)/rule-groups/([^/]+)", lambda f, g: self._put_group(f, g, body)),
        ]
        for verb, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                return self._send(*handler(*match.groups()))
        return self._send(404, {"message": f"no such endpoint in the test double: {method} {path}"})

    def do_GET(self) -> None:  # noqa: N802
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    # -- folders
    def _get_folder(self, uid: str) -> tuple[int, dict]:
        folder = self.server.folders.get(uid)
        return (200, folder) if folder else (404, {"message": "folder not found"})

    def _create_folder(self, body: dict) -> tuple[int, dict]:
        uid = body.get("uid")
        if not body.get("title") or not uid:
            return 400, {"message": "title and uid required"}
        if uid in self.server.folders:
            return 409, {"message": "a folder with the same uid already exists"}
        if any(f["title"] == body["title"] for f in self.server.folders.values()):
            return 409, {"message": "a folder with the same name already exists"}  # Grafana, top-level folders
        self.server.folders[uid] = {"uid": uid, "title": body["title"], "version": 1, "id": self.server.next_id}
        self.server.next_id += 1
        return 200, self.server.folders[uid]

    def _update_folder(self, uid: str, body: dict) -> tuple[int, dict]:
        folder = self.server.folders.get(uid)
        if folder is None:
            return 404, {"message": "folder not found"}
        if body.get("version") != folder["version"] and not body.get("overwrite"):
            return 412, {"message": "version mismatch"}
        folder.update(title=body["title"], version=folder["version"] + 1)
        return 200, folder

    # -- dashboards
    def _get_dashboard(self, uid: str) -> tuple[int, dict]:
        stored = self.server.dashboards.get(uid)
        return (200, copy.deepcopy(stored)) if stored else (404, {"message": "Dashboard not found"})

    def _save_dashboard(self, body: dict) -> tuple[int, dict]:
        board, folder_uid = body.get("dashboard") or {}, body.get("folderUid")
        uid = board.get("uid")
        if not uid or not board.get("title"):
            return 400, {"message": "dashboard uid and title required"}
        if folder_uid not in self.server.folders:
            return 400, {"message": "folder not found"}
        old = self.server.dashboards.get(uid)
        if old is not None and not body.get("overwrite"):
            return 412, {"message": "A dashboard with the same uid already exists"}
        ident = old["dashboard"]["id"] if old else self.server.next_id
        self.server.next_id += old is None
        version = old["dashboard"]["version"] + 1 if old else 1
        stored = {**board, "id": ident, "version": version}
        self.server.dashboards[uid] = {"dashboard": stored, "meta": {"folderUid": folder_uid, "version": version}}
        return 200, {"status": "success", "uid": uid, "id": ident, "version": version}

    # -- alert rules
    def _get_rule(self, uid: str) -> tuple[int, dict]:
        rule = self.server.rules.get(uid)
        return (200, copy.deepcopy(rule)) if rule else (404, {"message": "rule not found"})

    def _save_rule(self, uid: str | None, body: dict) -> tuple[int, dict]:
        required = ("title", "condition", "data", "folderUID", "ruleGroup", "for", "noDataState", "execErrState")
        missing = [k for k in required if k not in body]
        if missing:
            return 400, {"message": f"invalid alert rule: missing {missing}"}
        if body["folderUID"] not in self.server.folders:
            return 400, {"message": "folder does not exist"}
        if body["condition"] not in [q["refId"] for q in body["data"]]:
            return 400, {"message": "condition refers to no query"}
        if uid is None:
            uid = body.get("uid")
            if uid in self.server.rules:
                return 409, {"message": "rule uid exists"}
        elif uid not in self.server.rules:
            return 404, {"message": "rule not found"}
        stored = copy.deepcopy(body)
        for query in stored["data"]:  # defaults Grafana fills into every stored query model
            query["model"].setdefault("intervalMs", 1000)
            query["model"].setdefault("maxDataPoints", 43200)
        stored.update(uid=uid, id=self.server.next_id, provenance="api", updated="2026-01-01T00:00:00Z")
        self.server.next_id += 1
        self.server.rules[uid] = stored
        self.server.groups.setdefault((body["folderUID"], body["ruleGroup"]), 60)
        return (201 if self.command == "POST" else 200), stored

    def _get_group(self, folder: str, group: str) -> tuple[int, dict]:
        if (folder, group) not in self.server.groups:
            return 404, {"message": "rule group not found"}
        rules = [r for r in self.server.rules.values() if (r["folderUID"], r["ruleGroup"]) == (folder, group)]
        return 200, {
            "title": group,
            "folderUid": folder,
            "interval": self.server.groups[(folder, group)],
            "rules": rules,
        }

    def _put_group(self, folder: str, group: str, body: dict) -> tuple[int, dict]:
        if (folder, group) not in self.server.groups:
            return 404, {"message": "rule group not found"}
        self.server.groups[(folder, group)] = int(body["interval"])
        return 200, body


def _push(url: str, *extra: str, token: str = TOKEN) -> int:
    return cli.main(["grafana", "push", "--url", url, "--token", token, "--dir", str(GRAFANA_DIR), *extra])


def _expected() -> tuple[dict[str, dict], list[dict]]:
    boards = {b["uid"]: b for b in (json.loads(p.read_text()) for p in (GRAFANA_DIR / "dashboards").glob("*.json"))}
    rules = yaml.safe_load((GRAFANA_DIR / "provisioning/alerting/sentinel.yml").read_text())["groups"][0]["rules"]
    return boards, rules


def test_first_push_creates_everything_and_a_second_changes_nothing(capsys: pytest.CaptureFixture) -> None:
    boards, rules = _expected()
    with GrafanaDouble() as grafana:
        assert _push(grafana.url) == 0
        first = capsys.readouterr().out
        assert f"{1 + len(boards) + len(rules)} created, 0 updated, 0 unchanged" in first
        assert grafana.folders["llm-sentinel"]["title"] == "LLM Sentinel"
        assert set(grafana.dashboards) == set(boards) and len(boards) == 4
        for uid, stored in grafana.dashboards.items():
            assert stored["meta"]["folderUid"] == "llm-sentinel"
            assert {k: v for k, v in stored["dashboard"].items() if k not in ("id", "version")} == boards[uid]
        assert set(grafana.rules) == {r["uid"] for r in rules}
        for rule in rules:
            stored = grafana.rules[rule["uid"]]
            assert (stored["folderUID"], stored["ruleGroup"], stored["orgID"]) == ("llm-sentinel", "llm-sentinel", 1)
            assert stored["data"][0]["model"]["expr"] == rule["data"][0]["model"]["expr"]
        versions = {uid: b["dashboard"]["version"] for uid, b in grafana.dashboards.items()}

        grafana.log.clear()
        assert _push(grafana.url) == 0
        second = capsys.readouterr().out
        assert f"0 created, 0 updated, {1 + len(boards) + len(rules)} unchanged" in second
        assert grafana.writes() == [], "a second push must only read"
        assert {uid: b["dashboard"]["version"] for uid, b in grafana.dashboards.items()} == versions


def test_changed_objects_are_updated_in_place(capsys: pytest.CaptureFixture) -> None:
    with GrafanaDouble() as grafana:
        assert _push(grafana.url) == 0
        capsys.readouterr()
        overview = grafana.dashboards["sentinel-run-overview"]["dashboard"]
        ident, version = overview["id"], overview["version"]
        overview["panels"] = overview["panels"][:1]  # edited by hand in the UI
        grafana.rules["sentinel-spike-risk"]["data"][1]["model"]["conditions"][0]["evaluator"]["params"] = [0.99]
        grafana.folders["llm-sentinel"]["title"] = "renamed"
        grafana.groups[("llm-sentinel", "llm-sentinel")] = 300
        grafana.log.clear()

        assert _push(grafana.url) == 0
        out = capsys.readouterr().out
        assert "folder     LLM Sentinel: updated" in out
        assert "dashboard  LLM Sentinel / Run overview: updated" in out
        assert "rule       Spike risk high: updated" in out
        assert "group      llm-sentinel interval 60s: updated" in out
        assert "0 created, 4 updated" in out
        assert sorted(grafana.writes()) == sorted(
            [
                ("PUT", "/folders/llm-sentinel"),
                ("POST", "/dashboards/db"),
                ("PUT", "/v1/provisioning/alert-rules/sentinel-spike-risk"),
                ("PUT", "/v1/provisioning/folder/llm-sentinel/rule-groups/llm-sentinel"),
            ]
        )
        overview = grafana.dashboards["sentinel-run-overview"]["dashboard"]
        assert (overview["id"], overview["version"]) == (ident, version + 1), "same dashboard, next version"
        assert len(overview["panels"]) > 1
        evaluator = grafana.rules["sentinel-spike-risk"]["data"][1]["model"]["conditions"][0]["evaluator"]
        assert evaluator["params"] == [0.8]
        assert grafana.folders["llm-sentinel"]["title"] == "LLM Sentinel"
        assert grafana.groups[("llm-sentinel", "llm-sentinel")] == 60


def test_push_uses_a_folder_that_file_provisioning_created_by_title(capsys: pytest.CaptureFixture) -> None:
    """Alerting file provisioning names the folder by title only, so Grafana gave it a uid of its own."""
    boards, rules = _expected()
    with GrafanaDouble() as grafana:
        grafana.folders["aB3dE9x"] = {"uid": "aB3dE9x", "title": "LLM Sentinel", "version": 1, "id": 99}
        assert _push(grafana.url) == 0
        assert "folder     LLM Sentinel (uid aB3dE9x): unchanged" in capsys.readouterr().out
        assert list(grafana.folders) == ["aB3dE9x"]
        assert {b["meta"]["folderUid"] for b in grafana.dashboards.values()} == {"aB3dE9x"}
        assert len(grafana.dashboards) == len(boards) and len(grafana.rules) == len(rules)
        assert {r["folderUID"] for r in grafana.rules.values()} == {"aB3dE9x"}
        assert set(grafana.groups) == {("aB3dE9x", "llm-sentinel")}
        grafana.log.clear()
        assert _push(grafana.url) == 0
        assert f"0 created, 0 updated, {1 + len(boards) + len(rules)} unchanged" in capsys.readouterr().out
        assert grafana.writes() == []


def test_push_to_grafana_under_a_path_prefix(capsys: pytest.CaptureFixture) -> None:
    with GrafanaDouble(prefix="/grafana") as grafana:
        assert _push(grafana.url) == 0  # no trailing slash: http://host:port/grafana
        assert "Grafana 0.0.0-test-double at" in capsys.readouterr().out
        assert len(grafana.dashboards) == 4


def test_bad_token_is_a_clear_error_and_writes_nothing(capsys: pytest.CaptureFixture) -> None:
    with GrafanaDouble() as grafana:
        assert _push(grafana.url, token="wrong") == 1
        err = capsys.readouterr().err
        assert "refused the token (401 Unauthorized)" in err and "GRAFANA_TOKEN" in err
        assert grafana.writes() == [] and not grafana.dashboards


def test_token_without_write_permission(capsys: pytest.CaptureFixture) -> None:
    with GrafanaDouble(read_only_token="viewer") as grafana:
        assert _push(grafana.url, token="viewer") == 1
        err = capsys.readouterr().err
        assert "403 Forbidden" in err and "create folder llm-sentinel" in err


def test_unreachable_grafana(capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert _push(f"http://127.0.0.1:{port}", "--timeout", "2") == 1
    assert f"cannot reach Grafana at http://127.0.0.1:{port}" in capsys.readouterr().err

    with socket.socket() as silent:  # connections are accepted by the kernel, and nothing ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        assert _push(f"http://127.0.0.1:{port}", "--timeout", "0.5") == 1
    assert f"cannot reach Grafana at http://127.0.0.1:{port}" in capsys.readouterr().err


def test_usage_errors(capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRAFANA_TOKEN", raising=False)
    assert _push("ftp://grafana") == 2
    assert "is not an http(s) URL" in capsys.readouterr().err
    assert cli.main(["grafana", "push", "--url", "http://127.0.0.1:9"]) == 2
    assert "no token" in capsys.readouterr().err
    assert cli.main(["grafana", "push", "--url", "http://127.0.0.1:9", "--token", "t", "--dir", str(tmp_path)]) == 2
    assert "has no dashboards/ folder: give --dir" in capsys.readouterr().err
    (tmp_path / "dashboards").mkdir()
    assert cli.main(["grafana", "push", "--url", "http://127.0.0.1:9", "--token", "t", "--dir", str(tmp_path)]) == 2
    assert "run python grafana/generate.py" in capsys.readouterr().err


def test_without_dir_outside_a_checkout_the_error_says_dir_is_required(
    capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pip install has no grafana/ next to the package: the default must not point nowhere silently."""
    from agent import grafana_push

    monkeypatch.setattr(grafana_push, "CHECKOUT_DIR", tmp_path / "site-packages" / "grafana")
    assert cli.main(["grafana", "push", "--url", "http://127.0.0.1:9", "--token", "t"]) == 2
    err = capsys.readouterr().err
    assert "no --dir given" in err and "give --dir the grafana/ folder" in err and "pip install" in err
    monkeypatch.setattr(grafana_push, "CHECKOUT_DIR", GRAFANA_DIR)
    with GrafanaDouble() as grafana:
        assert cli.main(["grafana", "push", "--url", grafana.url, "--token", TOKEN]) == 0  # the checkout's default
    assert "created" in capsys.readouterr().out


def test_help_and_missing_extra() -> None:
    help_ = subprocess.run(
        [sys.executable, "-m", "agent", "grafana", "push", "--help"], capture_output=True, text=True, timeout=60
    )
    assert help_.returncode == 0
    assert "--url" in help_.stdout and "--token" in help_.stdout and "exit codes" in help_.stdout
    no_action = subprocess.run([sys.executable, "-m", "agent", "grafana"], capture_output=True, text=True, timeout=60)
    assert no_action.returncode == 2 and "ACTION" in no_action.stderr

    # grafana-client made unimportable, as in an install without the extra
    code = (
        "import sys; sys.modules['grafana_client'] = None; from agent.cli import main; "
        "sys.exit(main(['grafana', 'push', '--url', 'http://127.0.0.1:9', '--token', 't']))"
    )
    missing = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2, missing.stderr
    assert "pip install 'llm-sentinel[grafana]'" in missing.stderr

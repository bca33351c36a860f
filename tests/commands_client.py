"""A trainer's side of the command channel for tests, written against agent.commands only."""

from __future__ import annotations

import time

import zmq

from agent.commands import Ack, Command, Hello, decode
from sentinel.discovery import discovery_path, read_keys


class TrainerClient:
    """What a trainer's rank 0 does on the command channel, written against agent.commands only."""

    def __init__(
        self, endpoint: str, run: str = "r", *, curve: tuple[bytes, bytes, bytes] | None = None, plain: bool = False
    ):
        """``curve``: the client's (public, secret, server public) keys; without it, the keys a trainer
        of this user discovers for ``endpoint`` (sentinel/discovery.py), or none with ``plain=True``."""
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve is None and not plain:
            curve = read_keys(discovery_path(endpoint))
        if curve is not None:
            self.sock.curve_publickey, self.sock.curve_secretkey, self.sock.curve_serverkey = curve
        self.sock.connect(endpoint)
        self.run = run

    def hello(self, step: int = 0) -> None:
        self.sock.send(Hello(run=self.run, rank=0, step=step).encode())

    def send_raw(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def receive(self, timeout: float = 3.0) -> Command | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        msg = decode(self.sock.recv())
        assert isinstance(msg, Command)
        return msg

    def ack(self, cmd: Command, status: str = "applied", step: int = 0) -> None:
        self.sock.send(Ack(id=cmd.id, run=cmd.run, status=status, step=step).encode())

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)

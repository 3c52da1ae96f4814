"""The seed's WebSocket API with the official python-socketio client.

Starts its own topology (redis-server, SecantusDB, a persister and two gateways built by
cargo) on free ports, and stops it afterwards; with CHAT_MODE=embedded, one gateway in the
embedded mode instead.
"""

import os
import queue
import socket
import subprocess
import tempfile
import time
import unittest
import uuid
from pathlib import Path

import requests
import socketio

ROOT = Path(__file__).resolve().parents[2]
JWT_SECRET = "python-suite-secret-of-32-bytes-or-more"
TIMEOUT = 10


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, what, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, requests.RequestException):
            pass
        time.sleep(0.025)
    raise TimeoutError(what)


def port_open(port):
    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True


class Topology:
    def __init__(self):
        self.children = []
        self.data_dir = None
        try:
            if os.environ.get("CHAT_MODE") == "embedded":
                self.start_embedded()
            else:
                self.start_distributed()
        except BaseException:
            self.stop()  # nothing started here outlives a failed start
            raise

    def start_distributed(self):
        redis_port, mongo_port = free_port(), free_port()
        self.spawn([os.environ.get("REDIS_SERVER", "redis-server"), "--port", str(redis_port),
                    "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        self.spawn([os.environ.get("SECANTUSD", str(ROOT / ".venv/bin/secantusd-py")), "--host", "127.0.0.1",
                    "--port", str(mongo_port), "--storage-path", ":memory:", "--log-level", "WARNING"])
        wait_until(lambda: port_open(redis_port), "redis")
        wait_until(lambda: port_open(mongo_port), "secantusd")
        env = dict(os.environ, RUST_LOG="warn", HOST="127.0.0.1",
                   REDIS_URL=f"redis://127.0.0.1:{redis_port}", REDIS_PREFIX=f"py{os.getpid()}",
                   MONGODB_URI=f"mongodb://127.0.0.1:{mongo_port}", MONGODB_DB=f"py{os.getpid()}")
        admins = [free_port()]
        self.spawn([str(ROOT / "target/debug/persister")], dict(env, METRICS_PORT=str(admins[0])))
        self.urls = []
        for _ in range(2):
            port, admin = free_port(), free_port()
            admins.append(admin)
            self.spawn([str(ROOT / "target/debug/gateway")],
                       dict(env, PORT=str(port), METRICS_PORT=str(admin), JWT_SECRET=JWT_SECRET))
            self.urls.append(f"http://127.0.0.1:{port}")
        for admin in admins:
            wait_until(lambda: requests.get(f"http://127.0.0.1:{admin}/readyz", timeout=1).ok, "ready")

    def start_embedded(self):
        """One gateway process is the whole server; "both gateways" are that one."""
        self.data_dir = tempfile.TemporaryDirectory(prefix="chat-py-")
        port, admin = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MONGODB_URI")}
        env.update(RUST_LOG="warn", HOST="127.0.0.1", PORT=str(port), METRICS_PORT=str(admin),
                   JWT_SECRET=JWT_SECRET)
        self.spawn([str(ROOT / "target/debug/gateway"), "--embedded", "--data-dir", self.data_dir.name], env)
        self.urls = [f"http://127.0.0.1:{port}"] * 2
        wait_until(lambda: requests.get(f"http://127.0.0.1:{admin}/readyz", timeout=1).ok, "ready")

    def spawn(self, cmd, env=None):
        self.children.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL))

    def stop(self):
        for child in reversed(self.children):
            child.terminate()
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.kill()
        if self.data_dir is not None:
            self.data_dir.cleanup()


class SocketIoClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.topo = Topology()
        base = cls.topo.urls[0]
        cls.ann = cls.register(base, "ann")
        cls.bob = cls.register(base, "bob")
        resp = requests.post(f"{base}/chat/rooms", json={"participantIds": [cls.bob["user"]["_id"]]},
                             headers={"Authorization": f"Bearer {cls.ann['accessToken']}"}, timeout=TIMEOUT)
        assert resp.status_code == 201, resp.text
        cls.room = resp.json()["_id"]

    @classmethod
    def tearDownClass(cls):
        cls.topo.stop()

    @staticmethod
    def register(base, name):
        resp = requests.post(f"{base}/auth/register", timeout=TIMEOUT, json={
            "email": f"{name}-{uuid.uuid4().hex[:8]}@example.com", "password": "password123", "displayName": name})
        assert resp.status_code == 201, resp.text
        return resp.json()

    def client(self, gateway, transports, **kwargs):
        sio = socketio.Client(reconnection=False)
        inbox = queue.Queue()
        sio.on("message", lambda data: inbox.put(("message", data)), namespace="/chat")
        sio.on("user_typing", lambda data: inbox.put(("user_typing", data)), namespace="/chat")
        sio.connect(self.topo.urls[gateway], namespaces=["/chat"], transports=transports,
                    wait_timeout=TIMEOUT, **kwargs)
        self.addCleanup(sio.disconnect)
        return sio, inbox

    def test_refused_without_token(self):
        sio = socketio.Client(reconnection=False)
        errors = queue.Queue()
        sio.on("connect_error", errors.put, namespace="/chat")
        with self.assertRaises(socketio.exceptions.ConnectionError):
            sio.connect(self.topo.urls[0], namespaces=["/chat"], transports=["websocket"], wait_timeout=TIMEOUT)
        self.assertEqual(errors.get(timeout=TIMEOUT), {"message": "missing token"})
        sio.disconnect()

    def test_join_send_typing_on_both_transports(self):
        for transports in (["websocket"], ["polling"]):
            with self.subTest(transports=transports):
                a, a_inbox = self.client(0, transports, auth={"token": self.ann["accessToken"]})
                b, b_inbox = self.client(1, transports, headers={"Authorization": f"Bearer {self.bob['accessToken']}"})
                for sio in (a, b):
                    ack = sio.call("join_room", {"roomId": self.room}, namespace="/chat", timeout=TIMEOUT)
                    self.assertEqual(ack, {"ok": True, "roomId": self.room})
                ack = a.call("send_message", {"roomId": self.room, "content": "from python"},
                             namespace="/chat", timeout=TIMEOUT)
                self.assertTrue(ack["ok"], ack)
                expected = {"id": ack["id"], "roomId": self.room,
                            "sender": {"_id": self.ann["user"]["_id"], "email": self.ann["user"]["email"],
                                       "displayName": "ann"},
                            "content": "from python", "createdAt": ack["createdAt"]}
                event, received = b_inbox.get(timeout=TIMEOUT)
                # The room's sequence number: a positive integer, the same for every member.
                self.assertIsInstance(received.get("seq"), int)
                self.assertGreaterEqual(received["seq"], 1)
                expected["seq"] = received["seq"]
                self.assertEqual((event, received), ("message", expected))
                self.assertEqual(a_inbox.get(timeout=TIMEOUT), ("message", expected))
                a.emit("typing", {"roomId": self.room}, namespace="/chat")
                self.assertEqual(b_inbox.get(timeout=TIMEOUT),
                                 ("user_typing", {"userId": self.ann["user"]["_id"], "roomId": self.room}))
                a.disconnect()
                b.disconnect()


if __name__ == "__main__":
    unittest.main()

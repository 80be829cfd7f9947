"""How long is the API unavailable while `pmdaemon.py upgrade` replaces the daemon in place?

Run:  python3 bench_upgrade.py [UPGRADES]     (from the directory of pmdaemon.py)

A daemon from a copy of pmdaemon.py in a temporary home; 20 apps writing numbered lines as
fast as they can; 200 WebSocket clients; 4 threads doing GET /api/processes without pause
(a new connection each). Then UPGRADES upgrades (default 5). Reported: for each upgrade, the
longest time no GET was answered (the unavailability, as a client sees it); connections
refused; answers that were not 200; close codes the WebSocket clients got; whether every
app kept its pid and every log line is there once and whole.
"""

import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import test_pmdaemon as t

APPS, WS_CLIENTS, HAMMERS = 20, 200, 4
# About 1000 lines a second each, in bursts of 10.
COUNTER = "import sys, time\nfor n in range(10 ** 9):\n    print('line-%d' % n, flush=True)\n    if n % 10 == 0: time.sleep(0.01)\n"


def main(upgrades):
    directory = tempfile.mkdtemp(prefix="pmd-bench-")
    script = os.path.join(directory, "pmdaemon.py")
    shutil.copy(t.PMDAEMON, script)
    with open(os.path.join(directory, "counter.py"), "w") as handle:
        handle.write(COUNTER)
    daemon = t.Daemon(script=script, args=("--quiet", "--max-ws-clients", "1000"))
    answers, refused, stop = [], [], []
    close_codes = {}

    def read_websockets(clients):
        """Read every client as a browser would, until each is closed; count the close codes."""
        selector = selectors.DefaultSelector()
        for client in clients:
            client.sock.setblocking(False)
            selector.register(client.sock, selectors.EVENT_READ, client)
        while selector.get_map():
            for key, _ in selector.select(1):
                client = key.data
                try:
                    data = client.sock.recv(262144)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    data, code = b"", type(exc).__name__
                else:
                    code = "EOF"
                    for event in client.protocol.receive_data(data):
                        if event.kind == "close":
                            code = event.data[0]
                            data = b""
                if not data:
                    close_codes[code] = close_codes.get(code, 0) + 1
                    selector.unregister(client.sock)
                    client.close()

    def hammer():
        request = b"GET /api/processes HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        while not stop:
            try:
                with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
                    sock.sendall(request)
                    answers.append((time.monotonic(), t.status_of(t.recv_all(sock, 10))))
            except ConnectionRefusedError:
                refused.append(time.monotonic())
            except OSError as exc:
                answers.append((time.monotonic(), repr(exc)))
    try:
        names = ["bench-%d" % index for index in range(APPS)]
        for name in names:
            daemon.start(name, sys.executable, [os.path.join(directory, "counter.py")])
        pids = {name: daemon.wait_status(name, "online")["pid"] for name in names}
        threads = [threading.Thread(target=hammer) for _ in range(HAMMERS)]
        for thread in threads:
            thread.start()
        time.sleep(1)
        gaps = []
        for _ in range(upgrades):
            reader = threading.Thread(target=read_websockets, args=([t.WsClient(daemon.port) for _ in range(WS_CLIENTS)],))
            reader.start()
            time.sleep(0.5)
            began = time.monotonic()
            result = subprocess.run([sys.executable, t.PMDAEMON, "upgrade"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=dict(os.environ, PMDAEMON_HOME=daemon.home))
            assert result.returncode == 0, result
            time.sleep(0.5)
            times = sorted(when for when, status in answers if when >= began - 0.5)
            gaps.append(max(b - a for a, b in zip(times, times[1:])))
            reader.join()
        stop.append(True)
        for thread in threads:
            thread.join()
        kept = all(daemon.process(name)["pid"] == pids[name] for name in names)
        for name in names:
            daemon.post("/api/processes/%s/stop" % name)
        whole = True
        for name in names:
            with open(os.path.join(daemon.home, "logs", name + "-out.log")) as handle:
                numbers = [int(line.split(" line-")[1]) if " line-" in line else -1 for line in handle.read().splitlines()]
            if numbers != list(range(len(numbers))):
                whole = False
                print(name, "lines missing or repeated after", [a for a, b in zip(numbers, numbers[1:]) if b != a + 1][:5])
        print("python %s, %d apps, %d WebSocket clients, %d GET loops, %d upgrades"
              % (sys.version.split()[0], APPS, WS_CLIENTS, HAMMERS, upgrades))
        print("longest time without an answer, per upgrade (ms): %s"
              % " ".join("%.0f" % (gap * 1000) for gap in gaps))
        print("answers: %d, not 200: %d, refused: %d" % (len(answers), sum(1 for _, status in answers if status != 200),
                                                          len(refused)))
        print("WebSocket close codes: %s" % close_codes)
        with open(os.path.join(daemon.home, "pmdaemon.log")) as handle:
            print("".join(line for line in handle if "upgrad" in line), end="")
        print("every app kept its pid: %s; every log line once and whole: %s" % (kept, whole))
    finally:
        stop.append(True)
        daemon.terminate()
        daemon.cleanup()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)

"""Tests of pmdaemon.py: unittest only, real sockets on 127.0.0.1, real child processes, real files.

Run:  python3 -m unittest -v test_pmdaemon
Also: python3 test_pmdaemon.py ws-echo PORT   (an echo WebSocket server built from pmdaemon's
      own codec and session code, for Autobahn|Testsuite's echo cases)

The TestCase classes follow the sections of pmdaemon.py, one banner each, top to bottom:
1 constants (the Python 3.6 layer), 3 configuration, 4 metrics, 5 logs, 6 supervisor, 7 HTTP codec,
8 WebSocket codec, 9 API, 10 server glue, 11 CLI (2, errors, is tested where errors meet the wire).
Sub-banners group a section's tests by the part they exercise; the end-to-end ones run against a
daemon started as a subprocess (Daemon, below). The ws-echo, bench and browser commands come last.
"""

import base64
import collections
import contextlib
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat as stat_module
import struct
import subprocess
import sys
import tempfile
import time
import unittest

import pmdaemon

HERE = os.path.dirname(os.path.abspath(__file__))
PMDAEMON = os.path.join(HERE, "pmdaemon.py")
PY = sys.executable
# subprocess.run(capture_output=True) and text=True are 3.7+; the suite runs on 3.6 too.
CAPTURE = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def wait_until(predicate, timeout=10.0, interval=0.02, message="condition"):
    """Poll predicate until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, message))
        time.sleep(interval)


def temp_dir(test, prefix="pmd-"):
    """A new directory, removed with everything in it after the test."""
    directory = tempfile.mkdtemp(prefix=prefix)
    test.addCleanup(shutil.rmtree, directory, True)
    return directory


def pid_alive(pid):
    """True if pid exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


_compiled = []


def code_cache_for(home):
    """The daemon's code cache in home, written there as its first `web` would write it, or
    None where the home holds something else. `web` compiles the file (~0.15 s) and then
    re-executes itself from this cache; most daemons of the suite start on a home of their own,
    so they start from the cache directly. (The tests of the cache itself pass script=PMDAEMON
    and watch the daemon write it and move over.)"""
    if not _compiled:
        with open(PMDAEMON, "rb") as handle:
            source = handle.read()
        code = compile(source, PMDAEMON, "exec", dont_inherit=True)
        _compiled.append(pmdaemon.code_cache_header(source, PMDAEMON) + __import__("marshal").dumps(code))
    path = os.path.join(home, pmdaemon.CODE_CACHE_NAME)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        try:
            with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as handle:
                return path if handle.read() == _compiled[0] else None
        except OSError:
            return None
    except OSError:
        return None
    with open(descriptor, "wb") as handle:
        handle.write(_compiled[0])
    return path


class Daemon:
    """A real `pmdaemon.py web` subprocess on an ephemeral port with its own home."""

    def __init__(self, home=None, args=(), env=None, wrapper=(), script=None):
        self.home = home or tempfile.mkdtemp(prefix="pmd-test-")
        self.owns_home = home is None
        if script is None:                          # started as `web` re-executes itself
            script = code_cache_for(self.home) or PMDAEMON
        environ = dict(os.environ)
        environ.pop("PMDAEMON_API_KEY", None)
        environ.update(env or {})
        environ["PMDAEMON_HOME"] = self.home
        self.proc = subprocess.Popen(list(wrapper) + [PY, script, "web", "--port", "0", "--sample-interval", "0.2"]
                                     + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=environ, cwd=HERE)
        line = self.proc.stdout.readline().decode()
        if "listening on" not in line:
            self.proc.kill()
            _, errors = self.proc.communicate()         # and closes both pipes
            raise AssertionError("daemon did not start: %r %r" % (line, errors))
        self.port = int(line.split("://127.0.0.1:")[1].split()[0])
        self.headers = {}

    def request(self, method, path, body=None, headers=None, raw_body=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        all_headers = dict(self.headers)
        all_headers.update(headers or {})
        data = raw_body
        if body is not None:
            data = json.dumps(body).encode()
            all_headers.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=all_headers)
        response = conn.getresponse()
        payload = response.read()
        conn.close()
        parsed = json.loads(payload) if payload and "json" in (response.getheader("Content-Type") or "") else payload
        return response.status, response, parsed

    def get(self, path, **kwargs):
        return self.request("GET", path, **kwargs)

    def post(self, path, body=None, **kwargs):
        return self.request("POST", path, body=body, **kwargs)

    def start(self, name, script, args=(), **config):
        body = {"name": name, "script": script, "args": list(args)}
        body.update(config)
        status, _, data = self.post("/api/processes", body)
        if status != 201:
            raise AssertionError("start %s failed: %s %s" % (name, status, data))
        return data

    def process(self, key):
        status, _, data = self.get("/api/processes/%s" % key)
        return data if status == 200 else None

    def last_line(self, key):
        """The newest stdout line of a process, or "" while it has none."""
        logs = self.get("/api/logs/%s?lines=1&type=stdout" % key)[2]["logs"]
        return logs[-1]["message"] if logs else ""

    def wait_status(self, key, wanted, timeout=10):
        return wait_until(lambda: (self.process(key) or {}).get("status") == wanted and self.process(key),
                          timeout, message="%s to be %s" % (key, wanted))

    def raw(self, data, read_timeout=5.0):
        """Send raw bytes, return everything received until the server closes or goes quiet."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=read_timeout) as sock:
            sock.sendall(data)
            return recv_all(sock, read_timeout)

    def terminate(self, timeout=15):
        """SIGTERM the daemon; keep what it wrote to stderr in self.stderr_text."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.stderr_text = self.proc.communicate(timeout=timeout)[1].decode()
        return self.proc.returncode

    def cleanup(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if not stream.closed:
                stream.close()
        if self.owns_home:
            shutil.rmtree(self.home, ignore_errors=True)


def write_script(path, body):
    """An executable shell script; its path."""
    with open(path, "w") as handle:
        handle.write("#!/bin/sh\n%s\n" % body)
    os.chmod(path, 0o755)
    return path


def read_text(path):
    """A file's content, or "" while it does not exist."""
    try:
        with open(path) as handle:
            return handle.read()
    except FileNotFoundError:
        return ""


def read_environ(pid):
    try:
        with open("/proc/%d/environ" % pid, "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def recv_all(sock, timeout=5.0):
    sock.settimeout(timeout)
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def status_of(raw_response):
    return int(raw_response.split(b" ", 2)[1]) if raw_response else None


def json_of(raw_response):
    return json.loads(raw_response.split(b"\r\n\r\n", 1)[1])


class DaemonTestCase(unittest.TestCase):
    """One daemon shared by the tests of a class; each test uses its own process names."""
    daemon_args = ()
    daemon_env = None

    @classmethod
    def setUpClass(cls):
        cls.daemon = Daemon(args=cls.daemon_args, env=cls.daemon_env)

    @classmethod
    def tearDownClass(cls):
        try:
            cls.daemon.terminate()
        finally:
            cls.daemon.cleanup()

    def ws(self, **kwargs):
        """A WebSocket client to this class's daemon, closed after the test."""
        client = WsClient(self.daemon.port, **kwargs)
        self.addCleanup(client.close)
        return client

    def assertError(self, result, status, code, message=None):
        got_status, response, body = result
        self.assertEqual(got_status, status, body)
        self.assertIs(body["success"], False)
        self.assertEqual(body["error"]["code"], code, body)
        if message is not None:
            self.assertEqual(body["error"]["message"], message)
        self.assertEqual(response.getheader("Content-Type"), "application/json")
        return body


# ----------------------------------------------------------------------------------------------
# 1. Constants and enums: the Python 3.6 compatibility layer
# ----------------------------------------------------------------------------------------------

class TestRecord(unittest.TestCase):
    def test_a_record_is_what_a_dataclass_was(self):
        one = pmdaemon.ProcessConfig("app", "sleep", args=["1"])
        self.assertEqual((one.name, one.args, one.instances, one.cwd), ("app", ["1"], 1, None))
        self.assertIsNot(pmdaemon.ProcessConfig("a", "b").env, pmdaemon.ProcessConfig("a", "b").env)
        self.assertEqual(pmdaemon.record_replace(one), one)
        self.assertNotEqual(pmdaemon.record_replace(one, instances=2), one)
        self.assertTrue(repr(one).startswith("ProcessConfig(name='app', script='sleep', args=['1'], cwd=None,"))
        copied = pmdaemon.record_asdict(one)
        copied["args"].append("2")
        self.assertEqual((copied["name"], one.args), ("app", ["1"]))
        with self.assertRaisesRegex(TypeError, "missing argument 'script'"):
            pmdaemon.ProcessConfig(name="app")
        with self.assertRaisesRegex(TypeError, "unexpected argument 'colour'"):
            pmdaemon.ProcessConfig("app", "sleep", colour="red")

    def test_digits_are_ascii_digits(self):
        self.assertEqual([pmdaemon.is_ascii_digits(text) for text in ("0", "0912", "", "\u00b2", "\u0663", "1 ", "-1")],
                         [True, True, False, False, False, False, False])


def old_pythons():
    """Interpreters older than 3.6 on this machine (pyenv's or the system's)."""
    import glob
    found = {}
    for path in sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/*/bin/python[23].[0-9]"))
                       + glob.glob("/usr/bin/python[23].[0-9]") + glob.glob("/usr/local/bin/python[23].[0-9]")):
        version = os.path.basename(path)[len("python"):]
        if tuple(map(int, version.split("."))) < (3, 6) and os.access(path, os.X_OK):
            found.setdefault(version, path)
    return sorted(found.values())


class TestOldPythons(unittest.TestCase):
    def test_below_3_6_the_one_line_says_so(self):
        interpreters = old_pythons()
        if not interpreters:
            self.skipTest("no python2.7 or python3.5 on this machine")
        for python in interpreters:
            for argv in ([PMDAEMON], [PMDAEMON, "web", "--port", "0"]):
                with self.subTest(python=python, argv=argv):
                    result = subprocess.run([python] + argv, **CAPTURE, universal_newlines=True, timeout=30)
                    self.assertEqual(result.returncode, 1)
                    self.assertEqual(result.stdout, "")
                    self.assertIn("# needs Python 3.6 or newer", result.stderr)
                    self.assertTrue(result.stderr.rstrip().endswith("SyntaxError: invalid syntax"), result.stderr)


# ----------------------------------------------------------------------------------------------
# 3. Configuration
# ----------------------------------------------------------------------------------------------

class TestProcessConfig(unittest.TestCase):
    def parse(self, **fields):
        body = {"name": "app", "script": "sleep"}
        body.update(fields)
        return pmdaemon.ProcessConfig.from_dict(body)

    def assertFieldError(self, field, message, **fields):
        with self.assertRaises(pmdaemon.ValidationError) as caught:
            self.parse(**fields)
        self.assertEqual(pmdaemon.wire_error(caught.exception).status, 400)
        self.assertEqual(caught.exception.details, {"field": field})
        self.assertEqual(caught.exception.message, message)

    def test_defaults_and_normalisation(self):
        config = self.parse(port="3001", args=["1"], env={"A": "b"})
        self.assertEqual(config.port, "3001")
        self.assertEqual(config.cwd, os.getcwd())
        self.assertEqual(config.kill_timeout, 1600)
        self.assertEqual(config.max_restarts, 16)
        self.assertEqual(config.to_dict()["env"], {"A": "b"})

    def test_the_schema_states_the_bounds_the_parser_keeps(self):
        for name, field in pmdaemon.CONFIG_FIELDS.items():
            for bound, outside in (("minimum", -1), ("maximum", 1)):
                if bound in field.schema:
                    field.parse(field.schema[bound])
                    with self.assertRaises(pmdaemon.ValidationError, msg=name):
                        field.parse(field.schema[bound] + outside)
            if "maxItems" in field.schema:
                item = "app" if "pattern" in field.schema["items"] else field.schema["items"].get("minimum", "x")
                field.parse([item] * field.schema["maxItems"])
                with self.assertRaises(pmdaemon.ValidationError, msg=name):
                    field.parse([item] * (field.schema["maxItems"] + 1))

    def test_port_forms(self):
        for given, expected in ((3000, "3000"), ("3000", "3000"), ("3000-3003", "3000-3003"),
                                ("auto", "auto"), ("auto:4000-4100", "auto:4000-4100"), (None, None)):
            self.assertEqual(self.parse(port=given).port, expected, given)
        self.assertFieldError("port", "field 'port' must be a port (1-65535), a range like "
                              "\"3000-3003\", \"auto\" or \"auto:3000-3100\", got '70000'", port="70000")
        self.assertFieldError("port", "field 'port' must be a port number or string, got boolean", port=True)

    def test_sizes(self):
        self.assertEqual(self.parse(max_memory_restart="150M").max_memory_restart, 150 * 1024 ** 2)
        self.assertEqual(self.parse(max_memory_restart="1G").max_memory_restart, 1024 ** 3)
        self.assertEqual(self.parse(max_memory_restart=4096).max_memory_restart, 4096)
        self.assertEqual(self.parse(max_memory_restart="1.5G").max_memory_restart, 3 * 1024 ** 3 // 2)
        for bad in ("lots", "0M", "0.0001K", "1.5.5G"):
            self.assertFieldError("max_memory_restart", "field 'max_memory_restart' must be a size in "
                                  "bytes or like \"150M\" or \"1.5G\", got string \"%s\"" % bad, max_memory_restart=bad)

    def test_bad_fields_are_named(self):
        self.assertFieldError("colour", "unknown field 'colour'", colour="red")
        self.assertFieldError("name", "field 'name' must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}, got "
                              "'../x'", name="../x")
        self.assertFieldError("args", "field 'args' must be a string, got number 1", args=[1])
        self.assertFieldError("args", "field 'args' must be an array of at most 1024 strings, got "
                              "string \"x\"", args="x")
        self.assertFieldError("env", "field 'env' value of 'A' must be a string, got number 1", env={"A": 1})
        self.assertFieldError("instances", "field 'instances' must be between 1 and 64, got 0", instances=0)
        self.assertFieldError("instances", "field 'instances' must be an integer, got boolean", instances=True)
        self.assertFieldError("cwd", "field 'cwd' is not an existing directory: '/nonexistent-dir'",
                              cwd="/nonexistent-dir")
        self.assertFieldError("kill_signal", "field 'kill_signal' must be one of SIGTERM, SIGINT, "
                              "SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2, SIGKILL, got 'SIGFOO'", kill_signal="SIGFOO")
        with self.assertRaises(pmdaemon.PMDaemonError) as caught:
            pmdaemon.ProcessConfig.from_dict({"name": "x"})
        self.assertEqual(caught.exception.message, "field 'script' is required")
        with self.assertRaises(pmdaemon.PMDaemonError) as caught:
            pmdaemon.ProcessConfig.from_dict([1])
        self.assertEqual(caught.exception.message, "request body must be a JSON object, got array")


class TestLoneSurrogates(DaemonTestCase):
    def test_a_lone_surrogate_is_refused_naming_the_field(self):
        for body, field in (({"name": "sur", "script": "sleep", "env": {"SECRET": "\ud800"}}, "env.SECRET"),
                            ({"name": "sur", "script": "sleep", "args": ["60", "a\udc00"]}, "args[1]"),
                            ({"name": "sur\ud83d", "script": "sleep"}, "name")):
            value = dict(body["env"]) if "env" in body else body["args"][1] if "args" in body else body["name"]
            value = value["SECRET"] if isinstance(value, dict) else value
            error = self.assertError(self.daemon.post("/api/processes", body), 400, "VALIDATION_ERROR",
                                     "field %r must be Unicode text, got %r" % (field, value))
            self.assertEqual(error["error"]["details"], {"field": field})
        self.assertEqual(self.daemon.get("/api/processes")[2]["total"], 0)
        self.daemon.start("sur-ok", "sleep", ["60"], stdin=True, env={"EMOJI": "\U0001F600"})    # a pair is fine
        self.addCleanup(self.daemon.request, "DELETE", "/api/processes/sur-ok")
        self.assertEqual(self.daemon.process("sur-ok")["config"]["env"]["EMOJI"], "\U0001F600")
        self.assertError(self.daemon.post("/api/processes/sur-ok/stdin", {"data": "\udfff"}), 400,
                         "VALIDATION_ERROR", "field 'data' must be Unicode text, got '\\udfff'")
        client = self.ws()
        client.send_json({"type": "subscribe", "channel": "logs", "process": "\ud800"})
        message = client.recv_message("error")
        self.assertEqual(message["data"]["message"], "field 'process' must be Unicode text, got '\\ud800'")


# ----------------------------------------------------------------------------------------------
# 4. Metrics
# ----------------------------------------------------------------------------------------------

class TestProcParsers(unittest.TestCase):
    STAT = ("4242 (my (odd) prog) S 1 4242 4242 0 -1 4194304 100 0 0 0 250 50 0 0 20 0 1 0 "
            "123456 10000000 300 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0")

    def test_pid_stat_with_parentheses_in_name(self):
        stat = pmdaemon.parse_pid_stat(self.STAT)
        self.assertEqual((stat.pid, stat.state, stat.ppid, stat.pgid, stat.sid), (4242, "S", 1, 4242, 4242))
        self.assertEqual(stat.cpu_ticks, 300)
        self.assertEqual(stat.start_ticks, 123456)
        self.assertEqual(stat.rss_bytes, 300 * pmdaemon.PAGE_SIZE)

    def test_cpu_times_and_meminfo(self):
        self.assertEqual(pmdaemon.parse_cpu_times("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n"),
                         (150, 1000))
        total, available = pmdaemon.parse_meminfo("MemTotal:  1000 kB\nMemFree: 10 kB\nMemAvailable: 600 kB\n")
        self.assertEqual((total, available), (1024000, 614400))

    def test_sampler_reads_injected_proc_root(self):
        root = temp_dir(self)
        clock = [100.0]

        def write(name, text):
            os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
            with open(os.path.join(root, name), "w") as handle:
                handle.write(text)
        write("stat", "cpu  100 0 0 900 0 0 0 0\n")
        write("meminfo", "MemTotal: 1000 kB\nMemAvailable: 250 kB\n")
        write("uptime", "1234.56 99.0\n")
        write("4242/stat", self.STAT)
        sampler = pmdaemon.Sampler(root, clock=lambda: clock[0], wall=lambda: 0.0)
        first = sampler.system()
        self.assertEqual(first.cpu_usage, 0.0)
        write("stat", "cpu  150 0 0 950 0 0 0 0\n")           # 50 busy of 100
        second = sampler.system()
        self.assertEqual(second.to_api()["cpu"]["usage"], 50.0)
        self.assertEqual(second.to_api()["memory"], {"total": 1024000, "used": 768000,
                                                     "available": 256000, "usage_percent": 75.0})
        self.assertEqual(second.to_api()["uptime"], 1234)
        self.assertEqual(second.to_api()["timestamp"], "1970-01-01T00:00:00Z")
        self.assertEqual(list(sampler.scan()), [4242])
        self.assertEqual(sampler.tree_cpu("k", 300), 0.0)
        clock[0] += 2.0
        ticks = 300 + pmdaemon.CLOCK_TICKS                      # one CPU second in two seconds
        self.assertEqual(sampler.tree_cpu("k", ticks), 50.0)

    def test_scan_reads_only_processes_it_has_not_seen(self):
        """A pid seen under the same /proc inode is the same process: scan() keeps what it read;
        fresh() re-reads; a reused pid (a new directory, so a new inode) is read anew."""
        root = temp_dir(self)

        def write(pid, ppid, ticks, directory=None):
            directory = directory or str(pid)
            os.makedirs(os.path.join(root, directory), exist_ok=True)
            with open(os.path.join(root, directory, "stat"), "w") as handle:
                handle.write("%d (app) S %d %d 0 0 -1 0 0 0 0 0 %d 0 0 0 20 0 1 0 %d 100 25 0\n"
                             % (pid, ppid, pid, ticks, 500 + pid))
        write(10, 1, 5)
        write(11, 10, 7)
        sampler = pmdaemon.Sampler(root)
        self.assertEqual({pid: stat.cpu_ticks for pid, stat in sampler.scan().items()}, {10: 5, 11: 7})
        write(10, 1, 50)
        table = sampler.scan()
        self.assertEqual(table[10].cpu_ticks, 5)                  # known: not read again
        sampler.fresh(table, [10])
        self.assertEqual(table[10].cpu_ticks, 50)
        write(11, 1, 70, "new")                                   # the pid reused by another process:
        shutil.rmtree(os.path.join(root, "11"))                   # a directory with another inode
        os.rename(os.path.join(root, "new"), os.path.join(root, "11"))
        self.assertEqual((sampler.scan()[11].ppid, sampler.scan()[11].cpu_ticks), (1, 70))
        write(10, 1, 99)
        seen = [sampler.scan()[10].cpu_ticks for _ in range(pmdaemon.SCAN_FULL_EVERY)]
        self.assertEqual((seen[0], seen[-1]), (50, 99))            # every Nth scan reads everything
        descriptors = lambda: len(os.listdir("/proc/self/fd"))
        held = descriptors()                                       # 10 is re-read through an open file
        shutil.rmtree(os.path.join(root, "10"))
        self.assertNotIn(10, sampler.scan())
        self.assertEqual(descriptors(), held - 1)                  # closed once the pid is gone
        sampler.close()

    def test_fresh_drops_a_process_that_is_gone(self):
        child = subprocess.Popen(["sleep", "60"])
        sampler = pmdaemon.Sampler()
        self.addCleanup(sampler.close)
        table = sampler.scan()
        self.assertFalse(sampler.fresh(table, [child.pid]))         # read again: nothing changed
        self.assertEqual(table[child.pid].ppid, os.getpid())
        child.kill()
        child.wait()
        self.assertTrue(sampler.fresh(table, [child.pid]))
        self.assertNotIn(child.pid, table)

    def test_sampler_survives_missing_and_odd_proc_files(self):
        root = temp_dir(self)
        for name, text in (("stat", "intr 1 2 3\n"), ("meminfo", "MemFree: lots\n"), ("uptime", "")):
            with open(os.path.join(root, name), "w") as handle:
                handle.write(text)
        sampler = pmdaemon.Sampler(root, wall=lambda: 0.0)
        with self.assertLogs("pmdaemon", "WARNING") as logged:
            metrics = sampler.system()
            sampler.system()                                # reported once, not every second
        body = metrics.to_api()
        self.assertEqual((body["cpu"]["usage"], body["memory"]["total"], body["uptime"]), (0.0, 0, 0))
        self.assertEqual(len(logged.output), 3)
        self.assertIn("cannot read uptime from %s" % root, "\n".join(logged.output))
        os.unlink(os.path.join(root, "stat"))              # gone entirely: still no exception
        self.assertEqual(sampler.system().cpu_usage, 0.0)
        self.assertEqual(sampler.scan(), {})

    def test_descendants_follow_parent_links(self):
        def stat(pid, ppid):
            return pmdaemon.PidStat(pid, "S", ppid, pid, pid, 0, 0, 0)
        table = {p.pid: p for p in (stat(10, 1), stat(11, 10), stat(12, 11), stat(13, 1))}
        self.assertEqual(sorted(pmdaemon.descendants(table, 10)), [10, 11, 12])
        # 20,000 descendants in a chain and a fan: found in linear time (a list membership test
        # per pid made this quadratic: seconds per scan, every second).
        chain = {pid: stat(pid, pid - 1) for pid in range(100, 20100)}
        chain.update({pid: stat(pid, 100) for pid in range(30000, 50000)})
        children = pmdaemon.children_index(chain)
        self.assertEqual(len(pmdaemon.descendants(chain, 100, children)), 40000)
        self.assertEqual(pmdaemon.descendants(chain, 20099, children), [20099])


# ----------------------------------------------------------------------------------------------
# 5. Logs
# ----------------------------------------------------------------------------------------------

class TestLogs(unittest.TestCase):
    def setUp(self):
        self.dir = temp_dir(self)

    def test_a_partial_line_waits_for_silence_even_after_a_stalled_loop(self):
        """The pump writes a partial line after flush_after of silence; when the loop was
        stalled past that, the rest of the line may already be queued behind the timer (a
        subprocess pipe's data comes through call_soon): it is joined, not torn off."""
        import asyncio
        written = []

        async def scenario():
            loop = asyncio.get_event_loop()
            pump = pmdaemon.OutputPump(loop)
            pump.attach(written.extend, 0.05)
            pump.feed_data(b"a whole line\npart")
            due = loop.time() + 0.05
            # The pipe's read, due just before the flush timer, hands the rest on with call_soon.
            loop.call_at(due - 0.001, lambda: loop.call_soon(pump.feed_data, b"ial\n"))
            loop.call_soon(time.sleep, 0.1)                 # a stalled loop: both are due at once
            await asyncio.sleep(0.3)
            pump.feed_data(b"tail")
            await asyncio.sleep(0.2)                        # silence: the partial line is written
            self.assertEqual(written, ["a whole line", "partial", "tail"])
            pump.feed_eof()
            await asyncio.wait_for(pump.ended, 1)
        run_loop(scenario())

    def test_tail_lines_reads_backwards_across_blocks(self):
        path = os.path.join(self.dir, "f.log")
        with open(path, "wb") as handle:
            handle.write(b"".join(b"line %d\n" % i for i in range(1000)))
        for block in (3, 7, 64, 65536):
            self.assertEqual(pmdaemon.tail_lines(path, 3, block_size=block), [b"line 997", b"line 998", b"line 999"])
        self.assertEqual(len(pmdaemon.tail_lines(path, 5000, block_size=10)), 1000)
        self.assertEqual(pmdaemon.tail_lines(path, 0), [])
        self.assertEqual(pmdaemon.tail_lines(os.path.join(self.dir, "missing"), 5), [])
        # At most max_bytes are read: only whole lines inside that window come back.
        self.assertEqual(pmdaemon.tail_lines(path, 100, max_bytes=20), [b"line 998", b"line 999"])

    def test_tail_reads_what_it_returns_not_the_file(self):
        # A 64 GiB sparse file: a reader that scans the file (or rescans what it read) never ends.
        path = os.path.join(self.dir, "huge.log")
        with open(path, "wb") as handle:
            handle.truncate(64 << 30)
            handle.seek(0, os.SEEK_END)
            handle.write(b"\n" + b"".join(b"line %d\n" % i for i in range(100)))
        self.assertEqual(pmdaemon.tail_lines(path, 2), [b"line 98", b"line 99"])
        lines = pmdaemon.tail_lines(path, 10000)        # more than there are: stops at the byte cap
        self.assertEqual(lines, [b"line %d" % i for i in range(100)])     # the NUL run was cut, not read
        self.assertLessEqual(sum(len(line) + 1 for line in lines), pmdaemon.MAX_LOG_READ_BYTES)

    def test_rotation_keeps_max_files_and_tail_crosses_it(self):
        log_file = pmdaemon.LogFile(os.path.join(self.dir, "a.log"), max_size=100, max_files=3)
        for i in range(40):
            log_file.write(b"message number %02d\n" % i)        # 18 bytes each: 5 per file
        log_file.close()
        self.assertEqual(sorted(os.listdir(self.dir)), ["a.log", "a.log.1", "a.log.2"])
        self.assertTrue(all(os.path.getsize(os.path.join(self.dir, f)) <= 100 for f in os.listdir(self.dir)))
        tail = log_file.tail(12)
        self.assertEqual(tail, [b"message number %02d" % i for i in range(28, 40)])
        self.assertEqual(len(log_file.tail(1000)), 15)

    def test_split_output_cuts_long_lines_and_keeps_partial(self):
        lines, rest = pmdaemon.split_output(b"ab", b"c\r\nxyz\n0123456789tail", max_line=4)
        self.assertEqual(lines, [b"abc", b"xyz", b"0123", b"4567", b"89ta"])
        self.assertEqual(rest, b"il")
        self.assertEqual(pmdaemon.decode_output(b"\xff\x00ok"), "\ufffd\ufffdok")

    def test_process_logs_merge_types_in_time_order(self):
        hub, seen = pmdaemon.LogHub(), Subscriber()
        hub.subscribe(seen, ["web"])
        wall = [1000.0]
        logs = pmdaemon.ProcessLogs(self.dir, "web", 10 ** 6, 2, hub, self.fail, wall=lambda: wall[0])
        logs.write("stdout", ["one"])
        wall[0] += 1
        logs.write("stderr", ["two"])
        wall[0] += 1
        logs.write("stdout", ["three", "four"])
        entries = logs.tail(3)
        self.assertEqual([(e.type, e.message) for e in entries],
                         [("stderr", "two"), ("stdout", "three"), ("stdout", "four")])
        self.assertEqual(entries[0].timestamp, "1970-01-01T00:16:41.000Z")
        self.assertEqual([e.message for e in logs.tail(10, "stdout")], ["one", "three", "four"])
        self.assertEqual([(line.process, line.entry.message) for line in seen.lines],
                         [("web", "one"), ("web", "two"), ("web", "three"), ("web", "four")])
        logs.close()

    def test_hub_delivers_by_name_and_to_everyone_and_ends_follows(self):
        hub, web, every = pmdaemon.LogHub(), Subscriber(), Subscriber()
        hub.subscribe(web, ["web"])
        hub.subscribe(every, ["*"])
        entry = pmdaemon.LogEntry("t", "stdout", "m")
        hub.publish("web", [entry])
        hub.publish("db", [entry])
        self.assertEqual([line.process for line in web.lines], ["web"])
        self.assertEqual([line.process for line in every.lines], ["web", "db"])
        hub.end("web")
        self.assertEqual((web.ended, every.ended), (["web"], []))
        self.assertTrue(hub.listening("web"))           # "*" still listens to every process
        hub.end(None)
        self.assertEqual(every.ended, [None])
        self.assertFalse(hub.listening("web"))

    def test_a_failing_log_write_is_counted_reported_and_still_published(self):
        hub, seen, errors = pmdaemon.LogHub(), Subscriber(), []
        hub.subscribe(seen, ["app"])
        os.mkdir(os.path.join(self.dir, "app-out.log"))      # the log path is unusable: EISDIR
        logs = pmdaemon.ProcessLogs(self.dir, "app", 10 ** 6, 2, hub, errors.append)
        logs.write("stdout", ["a", "b"])
        logs.write("stderr", ["c"])
        self.assertEqual((logs.write_errors, logs.dropped_lines), (1, 2))
        self.assertIsInstance(errors[0], IsADirectoryError)
        self.assertEqual([line.entry.message for line in seen.lines], ["a", "b", "c"])
        os.rmdir(os.path.join(self.dir, "app-out.log"))      # the problem goes away: writes resume
        logs.write("stdout", ["d"])
        self.assertEqual([e.message for e in logs.tail(5, "stdout")], ["d"])
        logs.close()


class Subscriber:
    """A LogHub subscriber that keeps what it gets."""

    def __init__(self):
        self.lines, self.ended = [], []

    def on_log(self, line):
        self.lines.append(line)

    def on_log_end(self, name):
        self.ended.append(name)


# ----------------------------------------------------------------------------------------------
# 6. Supervisor
# ----------------------------------------------------------------------------------------------

# -- policy: restart decisions and health states as pure functions -----------------------------

class TestRestartPolicy(unittest.TestCase):
    def config(self, **fields):
        base = {"name": "app", "script": "sleep"}
        base.update(fields)
        return pmdaemon.ProcessConfig.from_dict(base)

    def test_restart_after_a_stable_run_resets_counters(self):
        decision = pmdaemon.decide_after_exit(self.config(), 1, 5000, 7, 3)
        self.assertEqual(decision, pmdaemon.ExitDecision("restart", 0, 0, 4, ""))

    def test_unstable_exits_lead_to_errored_after_max_restarts(self):
        config = self.config(max_restarts=3, min_uptime=1000)
        unstable = 0
        actions = []
        for _ in range(4):
            decision = pmdaemon.decide_after_exit(config, 1, 10, unstable, 0)
            unstable = decision.unstable_restarts
            actions.append(decision.action)
        self.assertEqual(actions, ["restart", "restart", "restart", "errored"])
        self.assertEqual(decision.reason, "exited 4 times in a row before min_uptime (1000 ms); "
                                          "max_restarts is 3")

    def test_stop_exit_codes_and_autorestart_off(self):
        self.assertEqual(pmdaemon.decide_after_exit(self.config(stop_exit_codes=[0, 3]), 3, 10, 0, 0).action, "stop")
        self.assertEqual(pmdaemon.decide_after_exit(self.config(stop_exit_codes=[3]), None, 10, 0, 0).action, "restart")
        self.assertEqual(pmdaemon.decide_after_exit(self.config(autorestart=False), 1, 10, 0, 0).action, "stop")

    def test_exponential_backoff_grows_caps_and_resets(self):
        config = self.config(exp_backoff_restart_delay=100, max_restarts=100)
        delays, backoff = [], 0
        for _ in range(16):
            decision = pmdaemon.decide_after_exit(config, 1, 10, 0, backoff)
            backoff = decision.backoff_count
            delays.append(decision.delay_ms)
        self.assertEqual(delays[:4], [100, 150, 225, 337])
        self.assertEqual(delays[-1], 15000)
        self.assertEqual(pmdaemon.decide_after_exit(config, 1, 30_000, 0, backoff).delay_ms, 100)

    def test_ports_for_instances(self):
        self.assertEqual(pmdaemon.assign_ports("3000", 3, set()), [3000, 3001, 3002])
        self.assertEqual(pmdaemon.assign_ports("3000-3003", 2, set()), [3000, 3001])
        self.assertEqual(pmdaemon.assign_ports(None, 2, set()), [None, None])
        with self.assertRaises(pmdaemon.ValidationError):
            pmdaemon.assign_ports("3000-3001", 3, set())
        with self.assertRaises(pmdaemon.PortConflict) as caught:
            pmdaemon.assign_ports("3001", 1, {3001})
        self.assertEqual(pmdaemon.wire_error(caught.exception).code, "PORT_CONFLICT")
        # Scaling keeps what each kept copy has; only new copies get new ports.
        blocker = socket.socket()
        blocker.bind(("127.0.0.1", 0))
        self.addCleanup(blocker.close)
        free = blocker.getsockname()[1]
        spec = "auto:%d-%d" % (free, free + 50)
        self.assertEqual(pmdaemon.assign_ports(spec, 1, set(), keep={0: free, 1: free + 1, 2: free + 2}), [free])


class TestHealthState(unittest.TestCase):
    def test_transitions(self):
        health = pmdaemon.HealthState()
        health.reset(True)
        self.assertEqual(health.status, "unknown")
        self.assertEqual(health.record(None, 10.0, retries=2), "healthy")
        self.assertIsNone(health.record("refused", 11.0, retries=2))          # one failure: still healthy
        self.assertEqual(health.record("refused", 12.0, retries=2), "unhealthy")
        self.assertIsNone(health.record("refused", 13.0, retries=2, may_fail=False))
        body = health.to_api({"type": "tcp", "enabled": True, "interval": 1000, "retries": 2}, "127.0.0.1:80")
        self.assertEqual((body["total_checks"], body["successful_checks"], body["success_rate"]), (4, 1, 25.0))
        self.assertEqual((body["consecutive_failures"], body["last_error"]), (3, "refused"))
        self.assertEqual(body["last_check"], "1970-01-01T00:00:13Z")


# -- in-process: a runner alone on an injected clock, the Supervisor with real children; cron ---

def run_loop(coroutine):
    """asyncio.run(coroutine) in the words 3.6 knows: a fresh event loop, closed after."""
    import asyncio
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coroutine)
    finally:
        # As asyncio.run does: cancel the tasks left and let the loop turn until they end. A
        # connection an in-process server closed is only closed on the loop's next turn; closing
        # the loop first leaves its socket open (a ResourceWarning).
        left = asyncio_tasks(loop)
        for task in left:
            task.cancel()
        try:
            if left:
                loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def asyncio_tasks(loop=None):
    """The loop's tasks not yet done (asyncio.all_tasks, which Python 3.6 keeps on Task)."""
    import asyncio
    all_tasks = getattr(asyncio, "all_tasks", None) or asyncio.Task.all_tasks     # 3.6
    return [task for task in all_tasks(loop or asyncio.get_event_loop()) if not task.done()]


def run_async(coroutine, timeout=20):
    """Run a scenario on a fresh event loop, bounded in time."""
    import asyncio
    return run_loop(asyncio.wait_for(coroutine, timeout))


class ManualTimer:
    def __init__(self, due, callback):
        self.due, self.callback, self.cancelled = due, callback, False

    def cancel(self):
        self.cancelled = True


class ManualClock:
    """A RunnerContext's clock and timers that move only when the test says so."""

    def __init__(self, now=1000.0):
        self.now = now
        self.timers = []

    def __call__(self):
        return self.now

    def call_later(self, delay, callback):
        timer = ManualTimer(self.now + delay, callback)
        self.timers.append(timer)
        return timer

    def pending(self):
        """Seconds to each timer not yet fired nor cancelled."""
        return [timer.due - self.now for timer in self.timers if not timer.cancelled]

    def advance(self, seconds):
        """Move on; the timers due by then fire, in order."""
        self.now += seconds
        for timer in sorted((timer for timer in self.timers if timer.due <= self.now), key=lambda timer: timer.due):
            self.timers.remove(timer)
            if not timer.cancelled:
                timer.callback()


async def until(predicate, timeout=10):
    """Wait (polling) for a real child to have done what the predicate says."""
    import asyncio
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("still not so after %g s" % timeout)
        await asyncio.sleep(0.005)


class TestProcessRunner(unittest.TestCase):
    """The supervisor in-process: real children, injected settings and spawner; a runner alone
    in a RunnerContext whose clock and timers the test drives."""

    def setUp(self):
        self.home = temp_dir(self, "pmd-runner-")

    def supervisor(self, spawner=None, **settings):
        kwargs = {"spawner": spawner} if spawner else {}
        return pmdaemon.Supervisor(self.home, settings=pmdaemon.SupervisorSettings(**settings), **kwargs)

    def config(self, **fields):
        body = {"name": "app", "script": "sleep", "args": ["30"]}
        body.update(fields)
        return pmdaemon.ProcessConfig.from_dict(body)

    def test_a_runner_alone_restarts_after_restart_delay_on_its_context_clock(self):
        clock, wall = ManualClock(), 1_800_000_000.0
        states, events = [], []

        def announce(kind, data):
            if kind == "process_update":
                states.append(data.state.value)
            elif kind == "process_event":
                events.append(data)

        async def scenario():
            tasks = pmdaemon.BackgroundTasks()
            context = pmdaemon.RunnerContext(log_dir=self.home, announce=announce, clock=clock,
                                             wall=lambda: wall + clock(), timers=clock, background=tasks.start)
            self.addCleanup(context.sampler.close)
            config = self.config(script=PY, args=["-c", "raise SystemExit(3)"], restart_delay=60_000,
                                 min_uptime=1000, max_restarts=1)
            runner = pmdaemon.ProcessRunner(context, 7, "app", config, 0, None)
            self.assertTrue(await runner.start())
            await until(lambda: runner.state is pmdaemon.ProcessState.RESTARTING)
            # The exit at clock 1000 s: uptime 0 ms on the context's clock; a timer of restart_delay.
            self.assertEqual(runner.last_exit, {"code": 3, "signal": None, "uptime": 0,
                                                "at": pmdaemon.iso_time(wall + 1000)})
            self.assertEqual((clock.pending(), runner.next_restart_wall), ([60.0], wall + 1060))
            clock.advance(59)
            await until(lambda: not tasks.tasks)                            # the exit is fully handled
            self.assertEqual((runner.state.value, runner.pid, runner.auto_restarts), ("restarting", None, 0))
            clock.advance(1)                                                # the delay has passed
            await until(lambda: runner.state is pmdaemon.ProcessState.ERRORED)
            # Its second exit, also before min_uptime, is one unstable exit more than max_restarts.
            reason = "exited 2 times in a row before min_uptime (1000 ms); max_restarts is 1"
            self.assertEqual((runner.auto_restarts, runner.unstable_restarts, runner.error), (1, 2, reason))
            self.assertEqual(states, ["starting", "online", "restarting", "starting", "online", "errored"])
            self.assertEqual([event["event"] for event in events],
                             ["started", "exited", "crashed", "restarted", "exited", "crashed", "errored"])
            self.assertEqual(events[-1], {"event": "errored", "process": "app", "id": 7, "reason": reason,
                                          "timestamp": pmdaemon.iso_time(wall + 1060)})
            self.assertEqual(clock.pending(), [])
            await runner.shut_down()
            notes = [line.split("[pmdaemon] ", 1)[1] for line in read_text(os.path.join(self.home, "app-err.log"))
                     .splitlines() if "[pmdaemon] " in line]
            self.assertEqual(notes, ["process exited with code 3 after 0 ms", "process exited with code 3 after 0 ms",
                                     "not restarting: " + reason])
        run_async(scenario())

    def test_a_runner_restores_its_own_saved_past(self):
        async def scenario():      # a runner is made where a loop runs (3.6's asyncio.Lock needs one)
            context = pmdaemon.RunnerContext(log_dir=self.home, announce=lambda kind, data: None)
            errored = pmdaemon.ProcessRunner(context, 3, "app", self.config(), 0, None, pmdaemon.ProcessState.ERRORED)
            left = errored.restore({"manual_restarts": 2, "restarts": 7, "error": "autorestart is off",
                                    "pid": 4242, "pid_start_ticks": 99, "run_token": "abc-3"})
            self.assertEqual((errored.manual_restarts, errored.auto_restarts, errored.restarts, errored.error),
                             (2, 5, 7, "autorestart is off"))
            self.assertEqual((left.token, left.pid, left.start_ticks), ("abc-3", 4242, 99))
            self.assertIs(errored.state, pmdaemon.ProcessState.ERRORED)
            stopped = pmdaemon.ProcessRunner(context, 4, "other", self.config(name="other"), 0, None)
            self.assertIsNone(stopped.restore({"restarts": 1, "error": "ignored: it was not errored"}))
            self.assertEqual((stopped.auto_restarts, stopped.error), (1, None))
            with self.assertRaises(ValueError):
                stopped.restore({"manual_restarts": -1})
            errored.logs.close()
            stopped.logs.close()
        run_async(scenario())

    @staticmethod
    def count_reads(supervisor):
        """How often each pid's /proc/PID/stat is read from now on (a Counter, kept current)."""
        reads, read_held = collections.Counter(), supervisor.sampler._read_held

        def counted(pid):
            reads[pid] += 1
            return read_held(pid)
        supervisor.sampler._read_held = counted
        return reads

    @staticmethod
    async def until_listed(supervisor):
        """Samples until one that lists /proc."""
        import asyncio
        while True:
            await asyncio.sleep(0.05)
            supervisor.metrics.sample()
            if supervisor.metrics._ticks % pmdaemon.LISTING_EVERY == 1:
                return

    def test_the_metrics_loop_reads_what_moves(self):
        """Sleeping trees are re-read every QUIET_EVERY-th tick once idle for QUIET_AFTER ticks;
        a busy one every tick; a sleeper that wakes shows its CPU within QUIET_EVERY ticks."""
        fifo = os.path.join(self.home, "wake")
        os.mkfifo(fifo)
        ready = os.path.join(self.home, "ready")
        spin = "import sys\nopen(sys.argv[2], 'w').close()\nopen(sys.argv[1]).read()\nwhile True: pass"
        # A quiet parent that starts a busy child: the child is counted from the next listing,
        # without the CPU it used before that landing in one sample.
        fork_fifo, fork_ready = os.path.join(self.home, "fork"), os.path.join(self.home, "fork-ready")
        os.mkfifo(fork_fifo)
        fork = ("import os, sys, time\nopen(sys.argv[2], 'w').close()\nopen(sys.argv[1]).read()\n"
                "if os.fork() == 0:\n    while True: pass\ntime.sleep(60)")
        # A busy parent that starts a busy child after a while: the child's CPU before it was
        # seen goes to the tree's baseline, not into one sample.
        trigger = os.path.join(self.home, "fork-now")
        busy_fork = "import os, sys\nwhile not os.path.exists(sys.argv[1]): pass\nos.fork()\nwhile True: pass"

        async def scenario():
            supervisor = self.supervisor()
            self.addCleanup(supervisor.sampler.close)
            sleepers = [(await supervisor.add(self.config(name="quiet-%d" % index)))[0] for index in range(5)]
            busy = (await supervisor.add(self.config(name="busy", script=PY, args=["-c", busy_fork, trigger])))[0]
            waking = (await supervisor.add(self.config(name="waking", script=PY, args=["-c", spin, fifo, ready])))[0]
            forking = (await supervisor.add(self.config(name="forking", script=PY, args=["-c", fork, fork_fifo,
                                                                                      fork_ready])))[0]
            await until(lambda: os.path.exists(ready) and os.path.exists(fork_ready))    # started, and wait
            reads = self.count_reads(supervisor)
            try:
                for _ in range(pmdaemon.QUIET_AFTER + 1):           # every tree read while it may be moving
                    supervisor.metrics.sample()
                    await asyncio.sleep(0.02)
                reads.clear()
                for _ in range(pmdaemon.QUIET_EVERY):
                    supervisor.metrics.sample()
                    await asyncio.sleep(0.02)
                self.assertEqual([reads[runner.pid] for runner in sleepers + [waking, forking]], [1] * 7)
                self.assertEqual(reads[busy.pid], pmdaemon.QUIET_EVERY)
                self.assertGreater(busy.cpu, 0)
                await self.until_listed(supervisor)
                open(trigger, "w").close()                          # it forks a busy child now,
                busy_cpu = []
                for _ in range(pmdaemon.LISTING_EVERY + 1):        # found at the next listing
                    await asyncio.sleep(0.05)
                    supervisor.metrics.sample()
                    busy_cpu.append(busy.cpu)
                self.assertLessEqual(max(busy_cpu), 250, busy_cpu)  # two cores' worth at most
                with open(fifo, "w") as handle:                     # wake it: it spins from now on
                    handle.write("go")
                with open(fork_fifo, "w") as handle:                # and its child spins
                    handle.write("go")
                await self.until_listed(supervisor)
                await asyncio.sleep(0.05)
                supervisor.metrics.sample()
                self.assertGreater(forking.cpu, 0)                  # quiet until the listing: read since
                for _ in range(pmdaemon.QUIET_EVERY):
                    await asyncio.sleep(0.05)
                    supervisor.metrics.sample()
                self.assertGreater(waking.cpu, 0)
            finally:
                await supervisor.shutdown()
        import asyncio
        run_async(scenario())

    def test_a_tick_follows_the_processes_that_changed_without_a_whole_roll(self):
        """Between whole rolls (every ROLL_EVERY-th tick) a tick learns who runs from what was
        announced: a quiet process restarted under a new pid is read at the next tick, and a
        deleted one is read no more."""
        import asyncio

        async def scenario():
            supervisor = self.supervisor()
            self.addCleanup(supervisor.sampler.close)
            [kept] = await supervisor.add(self.config(name="kept"))
            [gone] = await supervisor.add(self.config(name="gone"))
            reads = self.count_reads(supervisor)
            try:
                for _ in range(pmdaemon.QUIET_AFTER + 2):           # both quiet by now
                    supervisor.metrics.sample()
                    await asyncio.sleep(0.02)
                whole_rolls = []
                take_roll = supervisor.metrics._take_roll
                supervisor.metrics._take_roll = lambda: whole_rolls.append(1) or take_roll()
                old_pid, gone_pid = kept.pid, gone.pid
                await supervisor.restart("kept")
                await supervisor.delete("gone")
                self.assertNotEqual(kept.pid, old_pid)
                reads.clear()
                supervisor.metrics.sample()
                self.assertEqual((reads[kept.pid], reads[gone_pid], whole_rolls), (1, 0, []))
                self.assertGreater(kept.memory, 0)
                for _ in range(pmdaemon.QUIET_EVERY_MAX):
                    supervisor.metrics.sample()
                self.assertEqual((reads[old_pid], reads[gone_pid]), (0, 0))
            finally:
                await supervisor.shutdown()
        run_async(scenario())

    def test_many_quiet_trees_are_read_less_often_not_more_each_tick(self):
        """Past QUIET_READS_PER_TICK * QUIET_EVERY quiet trees, each is read less often (every
        QUIET_EVERY_MAX-th tick at the least), so a tick's reads stay bounded: here with a
        budget of one read a tick, 16 sleepers, each read once in 30 ticks, one a tick."""
        import asyncio

        async def scenario():
            supervisor = self.supervisor()
            self.addCleanup(supervisor.sampler.close)
            supervisor.metrics._quiet_reads = 1
            sleepers = []
            for index in range(16):
                sleepers += await supervisor.add(self.config(name="many-%d" % index))
            reads = self.count_reads(supervisor)
            try:
                for _ in range(pmdaemon.QUIET_AFTER + 1):           # until all are quiet
                    supervisor.metrics.sample()
                    await asyncio.sleep(0.02)
                per_tick = []
                reads.clear()
                for _ in range(pmdaemon.QUIET_EVERY_MAX):
                    before = sum(reads.values())
                    await asyncio.sleep(0.01)
                    supervisor.metrics.sample()
                    per_tick.append(sum(reads.values()) - before)
                self.assertEqual([reads[runner.pid] for runner in sleepers], [1] * 16)
                self.assertLessEqual(max(per_tick), 1, per_tick)
            finally:
                await supervisor.shutdown()
        run_async(scenario())

    def test_a_transition_outside_the_table_is_refused_and_logged(self):
        async def scenario():
            supervisor = self.supervisor()
            [runner] = await supervisor.add(self.config())
            self.assertIs(runner.state, pmdaemon.ProcessState.ONLINE)
            with self.assertLogs("pmdaemon", "ERROR") as logged:
                self.assertFalse(runner.change_state(pmdaemon.ProcessState.STARTING))
            self.assertIs(runner.state, pmdaemon.ProcessState.ONLINE)
            self.assertIn("bug: app cannot go from online to starting", logged.output[0])
            await supervisor.shutdown()
        run_async(scenario())

    def test_every_state_can_be_left(self):
        for state, targets in pmdaemon.TRANSITIONS.items():
            self.assertTrue(targets, state)
            self.assertTrue(all(isinstance(target, pmdaemon.ProcessState) for target in targets))
        self.assertEqual(set(pmdaemon.TRANSITIONS), set(pmdaemon.ProcessState))

    def test_a_stale_exit_is_ignored(self):
        async def scenario():
            supervisor = self.supervisor()
            [runner] = await supervisor.add(self.config())
            current = runner.run
            runner._on_exit(pmdaemon.Run("an-old-run", pid=1), 1)      # an exit of a replaced run
            self.assertIs(runner.run, current)
            self.assertEqual((runner.state, runner.last_exit), (pmdaemon.ProcessState.ONLINE, None))
            await supervisor.shutdown()
        run_async(scenario())

    def test_an_injected_spawner_that_fails_leaves_the_process_errored(self):
        async def refuse(argv, cwd, env, config):
            raise OSError(11, "Resource temporarily unavailable")

        async def scenario():
            supervisor = self.supervisor(spawner=refuse)
            [runner] = await supervisor.add(self.config())
            self.assertEqual((runner.state.value, runner.error),
                             ("errored", "cannot execute 'sleep': Resource temporarily unavailable"))
            with self.assertRaises(pmdaemon.CannotStart):
                await supervisor.start([runner])
            await supervisor.shutdown()
        run_async(scenario())

    def test_cgroup_limits_are_refused_where_no_cgroup_can_be_written(self):
        fake = temp_dir(self, "pmd-nocg-")
        with open(os.path.join(fake, "self-cgroup"), "w") as handle:
            handle.write("0::/user.slice\n")
        cgroups = pmdaemon.Cgroups(self.home, root=fake, proc_self=os.path.join(fake, "self-cgroup"))
        self.assertIsNone(cgroups.usable)

        async def scenario():
            supervisor = self.supervisor()
            supervisor._cgroups = cgroups
            with self.assertRaises(pmdaemon.ValidationError) as caught:
                await supervisor.add(self.config(memory_limit="64M"))
            self.assertEqual(caught.exception.message, "memory_limit needs a cgroup the daemon can write (cgroup v2 "
                             "delegated to it, or v1 as root): no writable cgroup hierarchy")
            await supervisor.shutdown()
        run_async(scenario())

    def test_cgroup_v2_layout_where_the_daemon_is_delegated_a_subtree(self):
        # This box has cgroup v1 (the real v1 path is tested end to end); v2's file layout is
        # checked on a directory shaped like a delegated v2 cgroup.
        fake = temp_dir(self, "pmd-cgv2-")
        base = os.path.join(fake, "system.slice", "pmd.service")
        os.makedirs(base)
        for name, text in (("cgroup.controllers", "cpuset cpu io memory pids"), ("cgroup.subtree_control", "")):
            with open(os.path.join(base, name), "w") as handle:
                handle.write(text)
        with open(os.path.join(fake, "self-cgroup"), "w") as handle:
            handle.write("0::/system.slice/pmd.service\n")
        cgroups = pmdaemon.Cgroups(self.home, root=fake, proc_self=os.path.join(fake, "self-cgroup"))
        self.assertEqual(cgroups.usable, "v2")
        self.assertEqual(read_text(os.path.join(base, "daemon", "cgroup.procs")), str(os.getpid()))
        self.assertEqual(read_text(os.path.join(base, "cgroup.subtree_control")), "+memory +cpu")
        procs = cgroups.prepare(5, 64 * 1024 * 1024, 50)
        self.assertEqual(procs, [os.path.join(base, "proc-5", "cgroup.procs")])
        self.assertEqual((read_text(os.path.join(base, "proc-5", "memory.max")),
                          read_text(os.path.join(base, "proc-5", "cpu.max"))), ("67108864", "50000 100000"))

    def test_a_crash_loop_does_not_rewrite_the_state_file(self):
        async def scenario():
            supervisor = self.supervisor(state_save_interval=0.02)
            [runner] = await supervisor.add(self.config(script=PY, args=["-c", "raise SystemExit(3)"],
                                                        min_uptime=0, max_restarts=1000))
            self.assertEqual(supervisor.store.writes, 1)            # the creation, at once
            self.assertTrue(await supervisor.wait_for_change(lambda: runner.auto_restarts >= 10, 15),
                            "the crash loop: 10 restarts")
            import asyncio
            while supervisor.store._timer is not None:              # until a look at the state ran
                await asyncio.sleep(0.005)
            self.assertEqual(supervisor.store.writes, 1)            # nothing durable changed
            await supervisor.stop([runner])
            while supervisor.store.writes < 2:                      # the stop is saved promptly
                await asyncio.sleep(0.01)
            saved = supervisor.store.load()["processes"][0]     # state.json and its journal
            self.assertEqual(saved["status"], "stopped")
            self.assertEqual(saved["restarts"], runner.restarts)   # runtime details ride along
            await supervisor.shutdown()
        run_async(scenario())

    def test_a_running_process_has_no_task_of_its_own(self):
        """A task is started when a process exits, not kept waiting while it runs (at a
        thousand processes that was 1.5 KB each): ten more processes, no more tasks; a kill
        -9 is still seen and restarted, and once handled no task is left over."""
        import asyncio

        async def scenario():
            supervisor = self.supervisor()
            await supervisor.add(self.config(name="first"))
            await asyncio.sleep(0.05)
            before = len(asyncio_tasks())
            runners = []
            for index in range(10):
                runners += await supervisor.add(self.config(name="more-%d" % index))
            self.assertEqual(len(asyncio_tasks()), before)
            pid = runners[0].pid
            os.kill(pid, signal.SIGKILL)
            self.assertTrue(await supervisor.wait_for_change(
                lambda: runners[0].pid not in (None, pid) and runners[0].state is pmdaemon.ProcessState.ONLINE, 10))
            self.assertEqual(runners[0].last_exit["signal"], "SIGKILL")
            await until(lambda: len(asyncio_tasks()) == before)
            await supervisor.shutdown()
        run_async(scenario())

    def test_a_spawn_out_of_descriptors_leaves_no_child_and_no_descriptor(self):
        """With the file limit a few descriptors above what is open, a spawn fails at its
        pipes or in Popen; cancelled while its stdin is wired, it fails after the fork: either
        way no descriptor stays open and no child runs on unseen or lingers as a zombie."""
        script = "\n".join([
            "import asyncio, os, resource, signal, sys",
            "sys.path.insert(0, %r)" % HERE,
            "import pmdaemon",
            "loop = asyncio.new_event_loop(); asyncio.set_event_loop(loop)",
            "pmdaemon.watch_children_by_pidfd(loop)",
            "config = pmdaemon.ProcessConfig.from_dict({'name': 'a', 'script': 'x', 'stdin': True})",
            "def children():",
            "    return [int(pid) for task in os.listdir('/proc/self/task')",
            "            for pid in open('/proc/self/task/%s/children' % task).read().split()]",
            "async def gone():                                 # killed, and reaped in the loop",
            "    for _ in range(200):",
            "        if not children():",
            "            return",
            "        await asyncio.sleep(0.01)",
            "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)",
            "outcomes = set()",
            "for spare in range(12):",
            "    before = len(os.listdir('/proc/self/fd'))",
            "    resource.setrlimit(resource.RLIMIT_NOFILE, (before + spare, hard))",
            "    try:",
            "        child = loop.run_until_complete(pmdaemon.spawn_child(['sleep', '30'], None, None, config))",
            "    except OSError as error:",
            "        outcomes.add('refused')",
            "    else:",
            "        outcomes.add('started')",
            "        os.killpg(child.pid, signal.SIGKILL)",
            "        loop.run_until_complete(asyncio.wait_for(child.exited, 10))",
            "        child.close_pipes()",
            "        loop.run_until_complete(asyncio.sleep(0.05))",
            "    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))",
            "    loop.run_until_complete(gone())",
            "    assert children() == [], (spare, children())",
            "    assert len(os.listdir('/proc/self/fd')) == before, (spare, os.listdir('/proc/self/fd'))",
            "async def cancelled():",
            "    spawning = asyncio.ensure_future(pmdaemon.spawn_child(['sleep', '30'], None, None, config))",
            "    await asyncio.sleep(0)",
            "    assert len(children()) == 1                  # forked, its stdin being wired",
            "    spawning.cancel()",
            "    await asyncio.wait([spawning])",
            "    await gone()",
            "    return spawning.cancelled()",
            "before = len(os.listdir('/proc/self/fd'))",
            "if loop.run_until_complete(cancelled()):",
            "    outcomes.add('cancelled')",
            "assert children() == [], children()",
            "assert len(os.listdir('/proc/self/fd')) == before, os.listdir('/proc/self/fd')",
            "print(sorted(outcomes))",
        ])
        result = subprocess.run([PY, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual((result.stdout.decode().strip(), result.stderr.decode()), ("['cancelled', 'refused', 'started']", ""))

    def test_an_exit_status_is_never_taken_by_subprocess_clean_up(self):
        """subprocess reaps the children of Popen objects dropped while running whenever
        another Popen is made; the daemon drops its own at once, so a child that exited
        meanwhile would be reaped there and its status lost (255). Here the zombie waits for
        the loop while the daemon makes another Popen (as a health check does)."""
        script = "\n".join([
            "import asyncio, gc, subprocess, sys, time",
            "sys.path.insert(0, %r)" % HERE,
            "import pmdaemon",
            "loop = asyncio.new_event_loop(); asyncio.set_event_loop(loop)",
            "pmdaemon.watch_children_by_pidfd(loop)",
            "config = pmdaemon.ProcessConfig.from_dict({'name': 'a', 'script': 'x'})",
            "child = loop.run_until_complete(pmdaemon.spawn_child([sys.executable, '-c', 'raise SystemExit(3)'],"
            " None, None, config))",
            "def state(pid):",
            "    try: return open('/proc/%d/stat' % pid).read().rsplit(')', 1)[1].split()[0]",
            "    except FileNotFoundError: return 'reaped'    # by a thread (asyncio's watcher, 3.8)",
            "while state(child.pid) not in ('Z', 'reaped'): time.sleep(0.01)",
            "gc.collect()",
            "subprocess.run(['true'])",
            "print(loop.run_until_complete(asyncio.wait_for(child.exited, 10)))",
        ])
        result = subprocess.run([PY, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual((result.stdout.decode().strip(), result.stderr.decode()), ("3", ""))


class TestCron(unittest.TestCase):
    """cron_restart: a pure parser and next-time function, checked against a table."""

    TABLE = [   # expression, after, next
        ("* * * * *", "2026-11-30 10:15:30", "2026-11-30 10:16"),
        ("0 3 * * *", "2026-11-30 10:15", "2026-12-01 03:00"),
        ("*/15 9-17 * * mon-fri", "2026-11-27 17:50", "2026-11-30 09:00"),     # Friday evening -> Monday
        ("30 2 1,15 * *", "2026-11-15 02:30", "2026-12-01 02:30"),
        ("0 0 * feb sun", "2026-11-30 00:00", "2027-02-07 00:00"),             # first Sunday of February
        ("0 12 13 * 5", "2026-11-30 00:00", "2026-12-04 12:00"),              # 13th OR a Friday
        ("5/20 * * * *", "2026-11-30 10:46", "2026-11-30 11:05"),
        ("0 0 29 2 *", "2026-03-01 00:00", "2028-02-29 00:00"),               # the next leap day
        ("59 23 31 12 7", "2026-12-31 23:59", "2027-12-05 23:59"),            # December only; 7 is Sunday
    ]

    def test_next_times(self):
        import datetime
        parse = lambda text: datetime.datetime.strptime(text, "%Y-%m-%d %H:%M" if text.count(":") == 1 else "%Y-%m-%d %H:%M:%S")
        for expression, after, expected in self.TABLE:
            with self.subTest(expression=expression):
                self.assertEqual(pmdaemon.parse_cron(expression).next_after(parse(after)), parse(expected))

    def test_bad_expressions_say_what_is_wrong(self):
        for expression, message in (("* * * *", "a cron expression has 5 fields (minute hour day month weekday), got 4"),
                                     ("60 * * * *", "'60' is not a minute (0-59)"),
                                     ("* * * smarch *", "'smarch' is not a month (1-12, or a name)"),
                                     ("*/0 * * * *", "bad step '0' in the minute field"),
                                     ("5-1 * * * *", "range '5-1' runs backwards in the minute field")):
            with self.subTest(expression=expression):
                with self.assertRaises(ValueError) as caught:
                    pmdaemon.parse_cron(expression)
                self.assertEqual(str(caught.exception), message)
        with self.assertRaises(pmdaemon.ValidationError) as caught:
            pmdaemon.ProcessConfig.from_dict({"name": "c", "script": "sleep", "cron_restart": "61 * * * *"})
        self.assertEqual(caught.exception.message, "field 'cron_restart': '61' is not a minute (0-59)")

    def test_a_scheduled_restart_happens_at_its_minute(self):
        home = temp_dir(self, "pmd-cron-")
        offset = [(60 - time.time() % 60) - 0.3]       # the clock reads 0.3 s before a minute starts

        async def scenario():
            supervisor = pmdaemon.Supervisor(home, wall=lambda: time.time() + offset[0])
            events = []
            supervisor.listeners.append(lambda kind, data: events.append(data["event"]) if kind == "process_event" else None)
            [runner] = await supervisor.add(pmdaemon.ProcessConfig.from_dict(
                {"name": "cron", "script": "sleep", "args": ["30"], "cron_restart": "* * * * *"}))
            first_pid = runner.pid
            self.assertTrue(await supervisor.wait_for_change(
                lambda: runner.restarts == 1 and runner.pid not in (None, first_pid), 10), "the restart at the minute")
            self.assertEqual((runner.manual_restarts, runner.state.value), (1, "online"))
            self.assertIn("cron_restart", events)
            await supervisor.shutdown()
        run_async(scenario())


class TestCronValidation(DaemonTestCase):
    def test_a_schedule_that_never_fires_is_refused(self):
        for text, error in (("0 0 31 2 *", "day of month '31' never comes in month '2'"),
                            ("0 0 30,31 feb *", "day of month '30,31' never comes in month 'feb'"),
                            ("0 0 31 4,6,9,11 *", "day of month '31' never comes in month '4,6,9,11'")):
            with self.assertRaises(ValueError) as caught:
                pmdaemon.parse_cron(text)
            self.assertEqual(str(caught.exception), error)
        import datetime
        after = datetime.datetime(2097, 3, 1)
        self.assertEqual(pmdaemon.parse_cron("0 0 29 2 *").next_after(after), datetime.datetime(2104, 2, 29))
        self.assertEqual(pmdaemon.parse_cron("0 0 31 2 mon").next_after(after), datetime.datetime(2098, 2, 3))
        self.assertEqual(pmdaemon.parse_cron("0 0 31 */2 *").next_after(after), datetime.datetime(2097, 3, 31))

    def test_the_api_answers_400_and_starts_nothing(self):
        self.assertError(self.daemon.post("/api/processes", {"name": "never", "script": "sleep", "args": ["60"],
                                                             "cron_restart": "0 0 31 2 *"}),
                         400, "VALIDATION_ERROR", "field 'cron_restart': day of month '31' never comes in month '2'")
        self.assertIsNone(self.daemon.process("never"))


# -- persistence: the journal, the state file, restoring what was saved ------------------------

class TestStateJournal(unittest.TestCase):
    """Changes appended and synced before they are acknowledged, replayed exactly."""

    def journal(self):
        journal = pmdaemon.StateJournal(os.path.join(temp_dir(self), "state.journal"))
        self.addCleanup(journal.close)
        return journal

    def test_what_was_committed_comes_back_and_concurrent_commits_share_a_sync(self):
        import asyncio
        journal = self.journal()

        async def scenario():
            async def change(index):
                journal.append({"put": {"id": index, "name": "p%d" % index}})
                await journal.commit()
            await asyncio.gather(*(change(index) for index in range(50)))
            journal.append({"delete": 7})
            journal.append({"put": {"id": 3, "name": "renamed"}})
            await journal.commit()
        run_async(scenario())
        self.assertLessEqual(journal.syncs, 3)              # 51 commits, one sync per batch
        state = pmdaemon.StateJournal(journal.path).replay({"next_id": 0, "processes": [{"id": 99, "name": "old"}]})
        names = {entry["id"]: entry["name"] for entry in state["processes"]}
        self.assertEqual(len(names), 50)                    # 0-49 but 7, and 99 from the snapshot
        self.assertEqual((names[3], names[99], 7 in names, state["next_id"]), ("renamed", "old", False, 50))

    def test_a_line_cut_short_or_damaged_ends_the_replay_and_is_cut_off(self):
        journal = self.journal()
        good = journal.line({"put": {"id": 0, "name": "a"}}) + journal.line({"put": {"id": 1, "name": "b"}})
        damaged = journal.line({"put": {"id": 2, "name": "c"}}).replace(b'"c"', b'"x"')
        for tail in (journal.line({"put": {"id": 2, "name": "c"}})[:-5],      # no newline: cut short
                     damaged, b"\0" * 64):                                       # or zeros after a power cut
            with self.subTest(tail=tail[:20]):
                with open(journal.path, "wb") as handle:
                    handle.write(good + tail + journal.line({"put": {"id": 3, "name": "d"}}))
                with self.assertLogs("pmdaemon", "WARNING") as said:
                    state = pmdaemon.StateJournal(journal.path).replay({"processes": []})
                self.assertIn("byte(s) after the last whole change were cut off", said.output[0])
                self.assertEqual([entry["name"] for entry in state["processes"]], ["a", "b"])
                self.assertEqual(read_text(journal.path).encode(), good)

    def test_a_failed_sync_is_not_acknowledged_and_leaves_no_part_of_a_line(self):
        journal = self.journal()
        os.mkdir(journal.path)                              # the journal cannot be opened for writing

        async def scenario():
            journal.append({"put": {"id": 0, "name": "a"}})
            await journal.commit()
        with self.assertRaises(pmdaemon.StateNotSaved) as caught:
            run_async(scenario())
        self.assertIn("cannot save state to %s: Is a directory" % journal.path, str(caught.exception))


class FakeRunner:
    """What the store asks of a process: its id (its entry comes from the test's table)."""

    def __init__(self, runner_id):
        self.id = runner_id


class TestStateStore(unittest.TestCase):
    """The saved list: acknowledged changes synced at once, the daemon's own ones sparingly."""

    def store(self, entries, save_interval=0.01, lazy_interval=0.4):
        runners = {runner_id: FakeRunner(runner_id) for runner_id in entries}
        store = pmdaemon.StateStore(os.path.join(temp_dir(self), "state.json"),
                                    lambda runner: entries[runner.id], lambda: list(runners.values()),
                                    lambda: {"next_id": len(entries)}, save_interval, lazy_interval)
        self.addCleanup(store.journal.close)
        return store, runners

    def test_runtime_details_alone_wait_for_the_lazy_interval(self):
        import asyncio
        entries = {0: ({"id": 0, "name": "a"}, {"pid": 1})}
        store, runners = self.store(entries)

        async def scenario():
            await store.commit([runners[0]])
            first_write = time.monotonic()
            store.touch(runners[0])
            while store._timer is not None:                         # until the look has run
                await asyncio.sleep(0.005)
            self.assertEqual(store.writes, 1)                       # nothing changed: no write
            entries[0] = ({"id": 0, "name": "a"}, {"pid": 2})
            store.touch(runners[0])
            while store.writes < 2:
                await asyncio.sleep(0.01)
            self.assertGreaterEqual(time.monotonic() - first_write, 0.4)
            entries[0] = ({"id": 0, "name": "b"}, {"pid": 2})
            store.touch(runners[0])
            while store.writes < 3:
                await asyncio.sleep(0.01)
        run_async(scenario())
        self.assertEqual(store.load()["processes"], [{"id": 0, "name": "b", "pid": 2}])
        self.assertEqual(oct(os.stat(store.journal.path).st_mode & 0o777), "0o600")

    def test_a_commit_is_on_disk_when_it_returns_and_costs_the_size_of_the_change(self):
        entries = {index: ({"id": index, "name": "p%d" % index, "pad": "x" * 200}, {}) for index in range(500)}
        store, runners = self.store(entries)
        store.flush()                                               # a snapshot of all 500
        snapshot = os.path.getsize(store.path)
        entries[7] = ({"id": 7, "name": "seven", "pad": ""}, {})

        async def scenario():
            await store.commit([runners[7]], deleted=[9])
        run_async(scenario())
        self.assertEqual(os.path.getsize(store.path), snapshot)       # the snapshot is not rewritten
        self.assertLess(os.path.getsize(store.journal.path), 200)     # two short lines
        loaded = {entry["id"]: entry for entry in store.load()["processes"]}
        self.assertEqual((loaded[7]["name"], 9 in loaded, len(loaded)), ("seven", False, 499))
        store.touch(runners[9])                                     # a late announcement of the deleted one
        self.assertNotIn(9, store._dirty)

    def test_the_journal_is_folded_into_the_snapshot_once_it_outgrows_it(self):
        entries = {0: ({"id": 0, "name": "a"}, {})}
        store, runners = self.store(entries)
        store.flush()

        async def scenario():
            for index in range(400):                                # each commit appends a line
                entries[0] = ({"id": 0, "name": "a", "step": index, "pad": "y" * 3000}, {})
                await store.commit([runners[0]])
        run_async(scenario())
        self.assertLess(os.path.getsize(store.journal.path), pmdaemon.JOURNAL_MIN_COMPACT + 4096)
        self.assertEqual(store.load()["processes"][0]["step"], 399)


class TestRestore(unittest.TestCase):
    def test_one_bad_saved_entry_neither_stops_the_daemon_nor_leaves_an_orphan(self):
        """A state file as an older version wrote it: a cron_restart that never fires and what
        that process left running. The daemon starts, the good entry runs, the bad one is kept
        aside, and its leftover is stopped."""
        home = temp_dir(self, "pmd-restore-")
        first = Daemon(home=home)
        self.addCleanup(first.cleanup)
        first.start("good", "sleep", ["60"])
        first.start("bad", "sleep", ["60"], cron_restart="0 0 1 1 *")
        first.terminate()
        token = "leftover-%d" % os.getpid()
        leftover = subprocess.Popen(["sleep", "300"], env=dict(os.environ, PMDAEMON_RUN_ID=token))
        self.addCleanup(lambda: (leftover.kill(), leftover.wait()))
        path = os.path.join(home, "state.json")
        with open(path) as handle:
            state = json.load(handle)
        bad = [entry for entry in state["processes"] if entry["name"] == "bad"][0]
        bad["config"]["cron_restart"] = "0 0 31 2 *"
        bad.update(status="online", run_token=token)
        with open(path, "w") as handle:
            json.dump(state, handle)
        second = Daemon(home=home)
        self.addCleanup(second.cleanup)
        self.assertEqual(second.process("good")["status"], "online")
        self.assertIsNone(second.process("bad"))
        wait_until(lambda: leftover.poll() is not None, message="the bad entry's leftover to be stopped")
        second.terminate()
        self.assertIn("cannot restore saved process 'bad': field 'cron_restart': day of month '31' never "
                      "comes in month '2'", second.stderr_text)
        self.assertEqual(len([f for f in os.listdir(home) if f.startswith("state.json.rejected-")]), 1)


# -- against a live daemon: what children see, signals, restarts, health, readiness ------------

class TestProcessSettings(DaemonTestCase):
    """The settings PM2 and supervisord users rely on, observed by the children themselves."""

    def last(self, name, text):
        return wait_until(lambda: self.daemon.last_line(name) if text in self.daemon.last_line(name) else None,
                          message="%s to say %r" % (name, text))

    def test_umask_and_rlimits_reach_the_child(self):
        probe = ("import os, resource\nmask = os.umask(0)\n"
                 "print('umask %03o nofile %s core %s' % (mask, resource.getrlimit(resource.RLIMIT_NOFILE), "
                 "resource.getrlimit(resource.RLIMIT_CORE)), flush=True)\nimport time; time.sleep(60)")
        self.daemon.start("set-lim", PY, ["-c", probe], umask="027", rlimits={"nofile": [256, 512], "core": 0})
        self.assertEqual(self.last("set-lim", "umask"), "umask 027 nofile (256, 512) core (0, 0)")
        config = self.daemon.process("set-lim")["config"]
        self.assertEqual((config["umask"], config["rlimits"]), (0o27, {"nofile": [256, 512], "core": [0, 0]}))
        for bad, message in (({"umask": "999"}, "field 'umask' must be octal like \"022\" (0 to 777), got string \"999\""),
                             ({"rlimits": {"files": 1}}, "unknown rlimit 'files' (one of as, core, cpu, data, fsize, "
                                                         "memlock, nofile, nproc, rss, stack)"),
                             ({"rlimits": {"nofile": [10, 5]}}, "rlimit 'nofile' must be a number or [soft, hard] "
                                                               "(-1 = unlimited, soft <= hard), got array")):
            self.assertError(self.daemon.post("/api/processes", dict({"name": "set-bad", "script": "sleep"}, **bad)),
                             400, "VALIDATION_ERROR", message)
        self.daemon.request("DELETE", "/api/processes/set-lim")

    def test_signal_and_stdin_reach_the_child(self):
        echo = ("import signal, sys\nsignal.signal(signal.SIGUSR1, lambda *a: print('got USR1', flush=True))\n"
                "print('ready', flush=True)\nfor line in sys.stdin:\n    print('read ' + line.strip(), flush=True)")
        self.daemon.start("set-io", PY, ["-c", echo], stdin=True)
        self.last("set-io", "ready")
        status, _, body = self.daemon.post("/api/processes/set-io/signal", {"signal": "SIGUSR1"})
        self.assertEqual((status, body["message"]), (200, "Signal SIGUSR1 sent to 'set-io'"))
        self.last("set-io", "got USR1")
        status, _, body = self.daemon.post("/api/processes/set-io/stdin", {"data": "hello child\n"})
        self.assertEqual((status, body["message"]), (200, "12 bytes written to the stdin of 'set-io'"))
        self.assertEqual(self.last("set-io", "read"), "read hello child")
        self.assertError(self.daemon.post("/api/processes/set-io/signal", {"signal": "SIGNOPE"}), 400, "VALIDATION_ERROR")
        self.daemon.start("set-noin", "sleep", ["60"])
        self.assertError(self.daemon.post("/api/processes/set-noin/stdin", {"data": "x"}), 409, "STDIN_UNAVAILABLE",
                         "Process 'set-noin' was not created with \"stdin\": true")
        self.daemon.post("/api/processes/set-noin/stop")
        self.assertError(self.daemon.post("/api/processes/set-noin/signal", {"signal": 10}), 409, "PROCESS_NOT_RUNNING")
        for name in ("set-io", "set-noin"):
            self.daemon.request("DELETE", "/api/processes/" + name)

    def test_env_file_and_interpreter(self):
        directory = tempfile.mkdtemp(prefix="pmd-set-", dir=self.daemon.home)
        with open(os.path.join(directory, ".env"), "w") as handle:
            handle.write("# secrets stay out of the API\nexport TOKEN='s3cret value'\nLEVEL=2\n")
        with open(os.path.join(directory, "app.py"), "w") as handle:
            handle.write("import os, sys, time\nprint(os.environ['TOKEN'], os.environ['LEVEL'], sys.argv[1:], "
                         "sys.flags.optimize, flush=True)\ntime.sleep(60)\n")
        self.daemon.start("set-env", "app.py", ["x"], cwd=directory, env_file=".env", env={"LEVEL": "3"},
                          interpreter=PY, interpreter_args=["-O"])
        self.assertEqual(self.last("set-env", "s3cret"), "s3cret value 3 ['x'] 1")
        self.assertNotIn("s3cret", json.dumps(self.daemon.process("set-env")))
        os.unlink(os.path.join(directory, ".env"))       # read at each start: a missing file is the reason
        self.assertError(self.daemon.post("/api/processes/set-env/restart"), 422, "START_FAILED")
        self.assertIn("env_file", self.daemon.process("set-env")["error"])
        self.daemon.request("DELETE", "/api/processes/set-env")

    def test_watch_restarts_once_after_the_debounce_and_ignores_what_it_should(self):
        directory = tempfile.mkdtemp(prefix="pmd-watch-", dir=self.daemon.home)
        with open(os.path.join(directory, "app.txt"), "w") as handle:
            handle.write("v1")
        self.daemon.start("set-watch", "sleep", ["60"], cwd=directory, watch=True, watch_delay=300,
                          watch_ignore=["*.tmp"])

        def scans():
            return (self.daemon.process("set-watch")["watching"] or {}).get("scans", 0)
        wait_until(lambda: scans() >= 1, message="the first look at the files")
        for version in ("v2", "v3", "v4"):              # a burst of changes: one restart
            with open(os.path.join(directory, "app.txt"), "w") as handle:
                handle.write(version + " " * len(version))
        wait_until(lambda: self.daemon.process("set-watch")["restarts"] == 1, message="the restart")
        settled = scans()
        wait_until(lambda: scans() >= settled + 3, message="three more looks")
        self.assertEqual(self.daemon.process("set-watch")["restarts"], 1)
        with open(os.path.join(directory, "scratch.tmp"), "w") as handle:   # ignored
            handle.write("x")
        settled = scans()
        wait_until(lambda: scans() >= settled + 3, message="three looks after the ignored change")
        self.assertEqual(self.daemon.process("set-watch")["restarts"], 1)
        notes = [e["message"] for e in self.daemon.get("/api/logs/set-watch?type=stderr")[2]["logs"]]
        self.assertIn("[pmdaemon] restarting: app.txt changed", notes)
        self.daemon.request("DELETE", "/api/processes/set-watch")

    @unittest.skipUnless(os.geteuid() == 0 and os.access("/usr/bin/python3", os.X_OK),
                         "needs root (and a python3 every user can run) to run a child as another user")
    def test_user_and_group(self):
        probe = ("import os\ntry:\n    open(%r).read(); state = 'state READ'\nexcept OSError:\n    state = 'state denied'\n"
                 "print(os.getuid(), os.getgid(), os.getgroups(), os.environ['USER'], os.environ['HOME'], state, "
                 "flush=True)\nimport time; time.sleep(60)" % os.path.join(self.daemon.home, "state.json"))
        self.daemon.start("set-user", "/usr/bin/python3", ["-c", probe], user="nobody", cwd="/")
        import pwd
        nobody = pwd.getpwnam("nobody")
        self.assertEqual(self.last("set-user", "state"), "%d %d %s nobody %s state denied" % (
            nobody.pw_uid, nobody.pw_gid, os.getgrouplist("nobody", nobody.pw_gid), nobody.pw_dir))
        self.assertError(self.daemon.post("/api/processes", {"name": "set-who", "script": "sleep", "user": "no-such-user"}),
                         400, "VALIDATION_ERROR", "no such user 'no-such-user'")
        self.daemon.request("DELETE", "/api/processes/set-user")

    def test_user_needs_a_root_daemon(self):
        config = pmdaemon.ProcessConfig.from_dict({"name": "u", "script": "sleep", "user": "nobody"})
        with self.assertRaises(pmdaemon.ValidationError) as caught:
            pmdaemon.resolve_identity(config, daemon_uid=1000)
        self.assertEqual(caught.exception.message, "running a process as another user needs the daemon to run as root")

    def test_log_files_where_the_operator_wants_them(self):
        directory = temp_dir(self, "pmd-logs-")
        out, err = os.path.join(directory, "app.out"), os.path.join(directory, "app.err")
        script = "echo to-out; echo to-err >&2; exec sleep 60"
        self.daemon.start("set-files", "sh", ["-c", script], out_file=out, error_file=err)
        wait_until(lambda: "to-err" in read_text(err) and "to-out" in read_text(out), message="both files")
        self.assertRegex(read_text(out), r"^\d{4}-\d\d-\d\dT[0-9:.]+Z to-out\n$")
        logs = self.daemon.get("/api/logs/set-files")[2]["logs"]
        self.assertEqual(sorted((e["type"], e["message"]) for e in logs), [("stderr", "to-err"), ("stdout", "to-out")])
        merged = os.path.join(directory, "merged.log")
        self.daemon.start("set-merged", "sh", ["-c", script], out_file=merged, merge_logs=True)
        wait_until(lambda: read_text(merged).count("\n") == 2, message="the merged file")
        self.assertEqual(sorted(line.split(" ", 1)[1] for line in read_text(merged).splitlines()),
                         ["stderr to-err", "stdout to-out"])
        logs = self.daemon.get("/api/logs/set-merged?type=stderr")[2]["logs"]
        self.assertEqual([(e["type"], e["message"]) for e in logs], [("stderr", "to-err")])
        plain = os.path.join(directory, "plain.log")
        self.daemon.start("set-plain", "sh", ["-c", "echo [12:00] stamped by the app; exec sleep 60"],
                          out_file=plain, log_date_format="none")
        wait_until(lambda: read_text(plain) == "[12:00] stamped by the app\n", message="the plain file")
        self.assertEqual(self.daemon.get("/api/logs/set-plain?type=stdout")[2]["logs"],
                         [{"timestamp": None, "type": "stdout", "message": "[12:00] stamped by the app"}])
        for body, message in (({"out_file": "relative.log"}, "field 'out_file' must be an absolute, normalised "
                                                            "file path, got 'relative.log'"),
                              ({"out_file": "/nonexistent-dir/x.log"}, "the directory of out_file "
                                                                        "'/nonexistent-dir/x.log' does not exist"),
                              ({"error_file": out}, "error_file %r is another process's log or inside the "
                                                    "daemon's home" % out),
                              ({"log_date_format": "%H:%M"}, "field 'log_date_format' must be one of iso, none, "
                                                            "got string \"%H:%M\"")):
            self.assertError(self.daemon.post("/api/processes", dict({"name": "set-bad-log", "script": "sleep"}, **body)),
                             400, "VALIDATION_ERROR", message)
        victim = os.path.join(directory, "victim")
        with open(victim, "w") as handle:
            handle.write("precious\n")
        planted = os.path.join(directory, "planted.log")
        os.link(victim, planted)                        # a hard link where a log file will go
        self.daemon.start("set-linked", "sh", ["-c", script], out_file=planted)
        wait_until(lambda: self.daemon.process("set-linked")["log_write_errors"] > 0, message="the refused write")
        self.assertEqual(read_text(victim), "precious\n")
        self.daemon.request("DELETE", "/api/processes/set-linked")
        self.daemon.request("DELETE", "/api/processes/set-files")
        self.assertTrue(os.path.exists(out))            # the operator's files are theirs: kept on delete
        for name in ("set-merged", "set-plain"):
            self.daemon.request("DELETE", "/api/processes/" + name)

    def test_cgroup_limits_cap_the_process_tree(self):
        probe = ("import os\ncg = dict(line.strip().split(':', 2)[1:] for line in open('/proc/self/cgroup'))\n"
                 "def read(controller, name):\n"
                 "    path = cg.get(controller) or cg.get('')\n"
                 "    sub = controller if controller in cg else ''\n"
                 "    return open(os.path.join('/sys/fs/cgroup', sub, path.lstrip('/'), name)).read().split()[0]\n"
                 "v1 = 'memory' in cg\n"
                 "print('limits', read('memory', 'memory.limit_in_bytes' if v1 else 'memory.max'),"
                 " read('cpu', 'cpu.cfs_quota_us' if v1 else 'cpu.max'), flush=True)\n"
                 "import time; time.sleep(60)")
        status, _, body = self.daemon.post("/api/processes", {"name": "set-cg", "script": PY, "args": ["-c", probe],
                                                              "memory_limit": "64M", "cpu_limit": 50})
        if status == 400:
            self.skipTest("no writable cgroups here: " + body["error"]["message"])
        self.assertEqual(self.last("set-cg", "limits"), "limits 67108864 50000")
        hog = "x = bytearray(256 * 1024 * 1024)\nimport time; time.sleep(60)"      # over the cap: killed
        self.daemon.start("set-cg-hog", PY, ["-c", hog], memory_limit="64M", autorestart=False)
        exited = wait_until(lambda: (self.daemon.process("set-cg-hog") or {}).get("last_exit"), message="the OOM kill")
        self.assertEqual(exited["signal"], "SIGKILL")
        paths = pmdaemon.Cgroups(self.daemon.home).paths(self.daemon.process("set-cg")["id"])
        self.assertTrue(paths and all(os.path.isdir(path) for path in paths), paths)
        self.daemon.request("DELETE", "/api/processes/set-cg")
        self.daemon.request("DELETE", "/api/processes/set-cg-hog")
        self.assertEqual([path for path in paths if os.path.exists(path)], [])     # removed with the process

    def test_namespaces_and_list_filters(self):
        self.daemon.start("ns-api-1", "sleep", ["60"], namespace="api")
        self.daemon.start("ns-api-2", "sleep", ["60"], namespace="api", autostart=False)
        self.daemon.start("ns-web-1", "sleep", ["60"])

        def names(query):
            return sorted(p["name"] for p in self.daemon.get("/api/processes?" + query)[2]["processes"])
        self.assertEqual(names("namespace=api"), ["ns-api-1", "ns-api-2"])
        self.assertEqual(names("namespace=api&status=online"), ["ns-api-1"])
        self.assertEqual(names("name=ns-*-1"), ["ns-api-1", "ns-web-1"])
        self.assertError(self.daemon.get("/api/processes?colour=red"), 400, "BAD_REQUEST",
                         "unknown query parameter 'colour' (allowed: status, namespace, name)")
        self.assertError(self.daemon.get("/api/processes?status=asleep"), 400, "VALIDATION_ERROR")
        status, _, body = self.daemon.post("/api/processes/ns:api/stop")       # actions on a namespace
        self.assertEqual(status, 200, body)
        self.assertEqual([name for name in names("status=online") if name.startswith("ns-")], ["ns-web-1"])
        self.assertEqual(names("namespace=api&status=stopped"), ["ns-api-1", "ns-api-2"])
        for name in ("ns-api-1", "ns-api-2", "ns-web-1"):
            self.daemon.request("DELETE", "/api/processes/" + name)


NOBODY_UID = 65534


AS_ROOT_WITH_ANOTHER_USER = unittest.skipUnless(os.geteuid() == 0, "needs root to run a process as another user")


class TestPathsAnAppControls(DaemonTestCase):
    """env_file, out_file and error_file name places that an app's own user may control: links,
    FIFOs and swapped directories must neither freeze the daemon nor lend it to that user."""

    def setUp(self):
        self.base = temp_dir(self, "pmd-paths-")
        os.chmod(self.base, 0o755)
        self.app = os.path.join(self.base, "app")           # the app's user's own directory
        os.mkdir(self.app, 0o755)
        if os.geteuid() == 0:
            os.chown(self.app, NOBODY_UID, NOBODY_UID)
        self.names = []

    def tearDown(self):
        for name in self.names:
            self.daemon.request("DELETE", "/api/processes/" + name)

    def create(self, name, **config):
        body = {"name": name, "script": "/bin/sh", "args": ["-c", 'echo "G=$GREETING S=$SECRET"; exec sleep 60'],
                "cwd": self.app}
        body.update(config)
        self.names.append(name)
        status, _, data = self.daemon.post("/api/processes", body)
        self.assertEqual(status, 201, data)
        return data["process"]

    def as_app_user(self, *paths):
        for path in paths:
            os.lchown(path, NOBODY_UID, NOBODY_UID)

    @AS_ROOT_WITH_ANOTHER_USER
    def test_env_file_is_read_with_the_processs_rights_and_never_through_a_link(self):
        secret = os.path.join(self.base, "secret.env")      # root's, 0600
        with open(secret, "w") as handle:
            handle.write("SECRET=topsecret\n")
        os.chmod(secret, 0o600)
        plain = os.path.join(self.app, "plain.env")
        with open(plain, "w") as handle:
            handle.write("GREETING=hello\n")
        os.symlink(secret, os.path.join(self.app, "link.env"))
        os.symlink("/proc/self/environ", os.path.join(self.app, "environ.env"))
        os.symlink(self.base, os.path.join(self.app, "conf"))
        self.as_app_user(plain, os.path.join(self.app, "link.env"), os.path.join(self.app, "environ.env"),
                         os.path.join(self.app, "conf"))
        self.create("env-plain", user="nobody", env_file="plain.env")
        wait_until(lambda: self.daemon.last_line("env-plain") == "G=hello S=", message="the plain env_file read")
        refused = {
            "env-link": ("link.env", "not a regular file with one link (a link, FIFO, device or hard link)"),
            "env-environ": ("environ.env", "not a regular file with one link (a link, FIFO, device or hard link)"),
            "env-dir-link": ("conf/secret.env", "%s/conf is a link or not a directory (links are not followed "
                             "here)" % self.app),
            "env-root-only": (secret, "Permission denied"),        # the process's own rights
        }
        for name, (env_file, reason) in refused.items():
            with self.subTest(env_file=env_file):
                process = self.create(name, user="nobody", env_file=env_file)
                self.assertEqual(process["status"], "errored")
                path = os.path.normpath(os.path.join(self.app, env_file))
                self.assertEqual(process["error"], "env_file %r cannot be used: %s" % (path, reason))
        self.assertNotIn("topsecret", json.dumps(self.daemon.get("/api/processes")[2]))

    @AS_ROOT_WITH_ANOTHER_USER
    def test_cwd_is_entered_with_the_processs_rights(self):
        hidden = os.path.join(self.base, "hidden")          # root's, 0700: nobody cannot pass
        os.makedirs(os.path.join(hidden, "pub"))
        os.chmod(hidden, 0o700)
        with open(os.path.join(hidden, "pub", "flag"), "w") as handle:
            handle.write("ROOTONLY\n")
        work = os.path.join(self.app, "work")
        os.mkdir(work)
        self.as_app_user(work)
        self.create("cwd-swap", user="nobody", cwd=work, args=["-c", "cat flag 2>/dev/null; exec sleep 60"],
                    autorestart=False)
        os.rename(work, work + ".old")                       # the app's user swaps its directory
        os.symlink(os.path.join(hidden, "pub"), work)
        self.as_app_user(work)
        status, _, body = self.daemon.post("/api/processes/cwd-swap/restart")
        self.assertEqual(status, 422, body)
        self.assertEqual(body["error"]["details"]["reason"], "cannot start '/bin/sh': the child could not enter "
                         "its cwd %r as user 'nobody' or set its limits" % work)
        logs = json.dumps(self.daemon.get("/api/logs/cwd-swap?lines=100")[2])
        self.assertNotIn("ROOTONLY", logs)

    def test_a_fifo_never_freezes_the_daemon(self):
        fifo = os.path.join(self.base, "fifo")
        os.mkfifo(fifo)
        process = self.create("fifo-env", env_file=fifo)
        self.assertEqual((process["status"], process["error"]), ("errored", "env_file %r cannot be used: not a "
                         "regular file with one link (a link, FIFO, device or hard link)" % fifo))
        out = self.create("fifo-out", out_file=fifo)
        self.assertEqual(out["status"], "online")               # the app runs; its lines cannot be kept
        self.assertGreaterEqual(self.daemon.process("fifo-out")["log_write_errors"], 1)
        self.assertEqual(self.daemon.get("/api/system")[0], 200)  # and the daemon still answers

    @AS_ROOT_WITH_ANOTHER_USER
    def test_a_swapped_log_directory_leads_nowhere(self):
        logs = os.path.join(self.app, "logs")
        os.mkdir(logs, 0o755)
        self.as_app_user(logs)
        victim_dir = os.path.join(self.base, "victim")      # root's: what the swap points at
        os.mkdir(victim_dir, 0o755)
        victim = os.path.join(victim_dir, "out.log")
        with open(victim, "w") as handle:
            handle.write("ROOT\n")
        self.create("swap", user="nobody", out_file=os.path.join(logs, "out.log"),
                    args=["-c", "while :; do echo tick; sleep 0.05; done"])
        wait_until(lambda: self.daemon.last_line("swap") == "tick", message="the first ticks")
        # The app's user moves its directory away and puts a link to root's in its place.
        os.rename(logs, logs + ".old")
        os.symlink(victim_dir, logs)
        self.as_app_user(logs)
        self.assertEqual(self.daemon.request("DELETE", "/api/logs/swap")[0], 200)     # flush: files go, then anew
        wait_until(lambda: os.path.exists(os.path.join(logs + ".old", "out.log")), message="the log begun anew")
        self.daemon.post("/api/processes/swap/restart")
        wait_until(lambda: self.daemon.process("swap")["log_write_errors"] >= 1, message="the swap refused")
        self.assertEqual(sorted(os.listdir(victim_dir)), ["out.log"])
        info = os.stat(victim)
        self.assertEqual((read_text(victim), info.st_uid), ("ROOT\n", 0))

    @AS_ROOT_WITH_ANOTHER_USER
    def test_log_files_follow_the_processs_user_and_others_are_never_given_away(self):
        import pwd
        try:
            other = pwd.getpwnam("daemon")
        except KeyError:
            self.skipTest("no user 'daemon' to change to")
        logs = os.path.join(self.base, "logs")              # root's directory: files are given to the user
        os.mkdir(logs, 0o755)
        out = os.path.join(logs, "out.log")
        self.create("owner", user="nobody", out_file=out)
        wait_until(lambda: os.path.exists(out) and os.path.getsize(out) > 0, message="the first line")
        self.assertEqual(os.stat(out).st_uid, NOBODY_UID)
        status, _, body = self.daemon.request("PATCH", "/api/processes/owner", {"user": "daemon"})
        self.assertEqual(status, 200, body)
        self.daemon.post("/api/processes/owner/restart")
        wait_until(lambda: os.stat(out).st_uid == other.pw_uid, message="the file given to the new user")
        # A file that was there before, someone else's, is never taken over nor given away.
        foreign = os.path.join(logs, "foreign.log")
        with open(foreign, "w") as handle:
            handle.write("bin's\n")
        os.chown(foreign, 2, 2)
        self.create("foreign", user="nobody", out_file=foreign)
        wait_until(lambda: self.daemon.process("foreign")["log_write_errors"] >= 1, message="the write refused")
        self.assertEqual((read_text(foreign), os.stat(foreign).st_uid), ("bin's\n", 2))


def in_use_as_group(number):
    """Whether a process has `number` as its group or session id (so no new process can get it)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if number in (int(fields[2]), int(fields[3])):
                return True
    return False


def spawn_with_pid(pid, argv):
    """A child (its own session and group, so its group id is `pid` too) that the kernel gives
    `pid` (needs root: the next pid is chosen through ns_last_pid), or None if another process
    took that pid first."""
    for _ in range(5):
        with open("/proc/sys/kernel/ns_last_pid", "w") as handle:
            handle.write(str(pid - 1))
        child = subprocess.Popen(argv, start_new_session=True)
        if child.pid == pid:
            return child
        child.kill()
        child.wait()
    return None


class TestSignalsReachOnlyOurs(DaemonTestCase):
    """A pid the main process had may be given to someone else once it is gone: signals go to
    what the run started, never by a pid or a group id that changed hands."""

    def test_an_exit_is_seen_while_a_background_child_holds_the_output(self):
        # The child keeps the stdout pipe open; the main process's exit must not wait for it.
        self.daemon.start("held", "/bin/sh", ["-c", "sleep 30 & exit 3"], autorestart=False)
        stopped = self.daemon.wait_status("held", "stopped")
        self.assertEqual(stopped["last_exit"]["code"], 3)
        self.daemon.request("DELETE", "/api/processes/held")

    @unittest.skipUnless(os.geteuid() == 0, "needs root to choose the next pid (ns_last_pid)")
    def test_a_reused_pid_is_never_signalled(self):
        # The main process exits at once; its setsid child ignores SIGTERM and lingers until
        # kill_timeout, while the API still shows the main process's pid. (The main process
        # waits until the child ignores SIGTERM: the stop at its exit must not kill it first.)
        ready = os.path.join(temp_dir(self), "ready")
        created = self.daemon.start("reuse", "/bin/sh", ["-c", "setsid sh -c \"trap '' TERM; : > %s; exec sleep 30\" "
                                                         ">/dev/null 2>&1 & while [ ! -e %s ]; do sleep 0.01; done"
                                                         % (ready, ready)], kill_timeout=2000, autorestart=False)
        pid = created["process"]["pid"]
        wait_until(lambda: not os.path.exists("/proc/%d" % pid) and not in_use_as_group(pid),
                   message="the main process reaped and its setsid child in a session of its own")
        bystander = spawn_with_pid(pid, ["sleep", "60"])
        if bystander is None:
            self.skipTest("pid %d was taken by another process first" % pid)
        self.addCleanup(bystander.wait)
        self.addCleanup(bystander.kill)
        self.assertNotEqual(self.daemon.process("reuse")["status"], "stopped")   # still lingering
        self.assertError(self.daemon.post("/api/processes/reuse/signal", {"signal": "SIGTERM"}), 409,
                         "PROCESS_NOT_RUNNING")
        self.daemon.wait_status("reuse", "stopped", timeout=15)     # the lingering child, killed at 2 s
        self.assertIsNone(bystander.poll(), "the process that got the old pid was signalled")
        self.daemon.request("DELETE", "/api/processes/reuse")


class TestSupervision(DaemonTestCase):
    daemon_env = {"PMDAEMON_API_KEY": "", "SECRET_PROBE": "visible"}

    @unittest.skipUnless(hasattr(os, "pidfd_open"), "this Python watches children with a thread each")
    def test_children_are_watched_without_a_thread_each(self):
        """Exits come from a pidfd per child in the event loop: eight children, a kill -9 and
        a restart later, the daemon has no more threads than before them."""
        threads = lambda: len(os.listdir("/proc/%d/task" % self.daemon.proc.pid))
        before = threads()
        for index in range(8):
            self.daemon.start("sv-thread-%d" % index, "sleep", ["60"])
        pid = self.daemon.process("sv-thread-0")["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: self.daemon.process("sv-thread-0")["pid"] not in (None, pid), message="the restart")
        # The main thread, and perhaps the pool's workers for state syncs and log reads.
        self.assertLessEqual(threads(), max(before, 3))
        for index in range(8):
            self.daemon.request("DELETE", "/api/processes/sv-thread-%d" % index)

    @unittest.skipUnless(hasattr(os, "pidfd_open") and sys.version_info < (3, 14),
                         "a pidfd per child where the loop watches children by pidfd (Python 3.9-3.13)")
    def test_a_managed_process_holds_one_pidfd(self):
        """The run signals through the pidfd the loop watches its exit with: one per process,
        through a kill -9 and its restart, and none left once they are deleted."""
        def pidfds():
            directory, count = "/proc/%d/fd" % self.daemon.proc.pid, 0
            for name in os.listdir(directory):
                with contextlib.suppress(FileNotFoundError):     # closed since the listing
                    count += os.readlink(os.path.join(directory, name)) == "anon_inode:[pidfd]"
            return count
        before = pidfds()
        for index in range(5):
            self.daemon.start("sv-pidfd-%d" % index, "sleep", ["60"])
        self.assertEqual(pidfds() - before, 5)
        pid = self.daemon.process("sv-pidfd-0")["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: self.daemon.process("sv-pidfd-0")["pid"] not in (None, pid), message="the restart")
        self.assertEqual(pidfds() - before, 5)
        for index in range(5):
            self.daemon.request("DELETE", "/api/processes/sv-pidfd-%d" % index)
        wait_until(lambda: pidfds() == before, message="every pidfd closed")

    def test_crashed_child_is_restarted_and_counted(self):
        created = self.daemon.start("sv-crash", PY, ["-c", "import time; time.sleep(0.4); raise SystemExit(2)"],
                                    min_uptime=200)
        first = created["process"]["pid"]
        restarted = wait_until(lambda: (lambda p: p if p["restarts"] >= 1 and p["pid"] and p["pid"] != first else None)(
            self.daemon.process("sv-crash")), 10, message="a restart")
        self.assertEqual(restarted["status"], "online")
        self.assertEqual(restarted["last_exit"]["code"], 2)
        messages = [e["message"] for e in self.daemon.get("/api/logs/sv-crash?type=stderr")[2]["logs"]]
        self.assertTrue(any(m.startswith("[pmdaemon] process exited with code 2 after ") for m in messages), messages)
        self.daemon.request("DELETE", "/api/processes/sv-crash")

    def test_crash_loop_ends_errored_and_stays_down(self):
        self.daemon.start("sv-loop", PY, ["-c", "raise SystemExit(1)"], max_restarts=3, min_uptime=5000)
        errored = self.daemon.wait_status("sv-loop", "errored")
        self.assertEqual(errored["restarts"], 3)
        self.assertEqual(errored["error"], "exited 4 times in a row before min_uptime (5000 ms); max_restarts is 3")
        self.assertIsNone(errored["pid"])
        self.daemon.request("DELETE", "/api/processes/sv-loop")

    def test_stop_kills_the_whole_process_group(self):
        created = self.daemon.start("sv-tree", "sh", ["-c", "sleep 999 & sleep 999"])
        leader = created["process"]["pid"]
        children = wait_until(lambda: [int(p) for p in os.listdir("/proc") if p.isdigit() and pid_alive(int(p))
                                       and os.getpgid(int(p)) == leader and int(p) != leader] if pid_alive(leader) else [],
                              message="the background sleep")
        self.daemon.post("/api/processes/sv-tree/stop")
        self.assertEqual(self.daemon.process("sv-tree")["status"], "stopped")
        for pid in [leader] + children:
            self.assertFalse(pid_alive(pid), pid)
        self.daemon.request("DELETE", "/api/processes/sv-tree")

    def test_stop_finds_setsid_and_double_forked_descendants(self):
        pids_file = os.path.join(self.daemon.home, "escapees")
        script = ("import os, sys, time\n"
                  "def spawn(double):\n"
                  "    if os.fork() == 0:\n"
                  "        os.setsid()\n"
                  "        if double and os.fork() != 0:\n"
                  "            os._exit(0)\n"            # the middle process exits: an orphan remains
                  "        with open(%r, 'a') as f: f.write('%%d\\n' %% os.getpid())\n"
                  "        time.sleep(999)\n"
                  "spawn(False)\nspawn(True)\ntime.sleep(999)\n" % pids_file)
        leader = self.daemon.start("sv-escape", PY, ["-c", script])["process"]["pid"]
        escaped = wait_until(lambda: [int(p) for p in read_text(pids_file).split()] if
                             len(read_text(pids_file).split()) == 2 else None, message="two escapees")
        for pid in escaped:
            self.assertTrue(pid_alive(pid))
            self.assertNotEqual(os.getpgid(pid), leader)           # truly outside the group
        self.daemon.post("/api/processes/sv-escape/stop")
        self.assertEqual([pid_alive(pid) for pid in escaped], [False, False])
        self.daemon.request("DELETE", "/api/processes/sv-escape")

    def test_stop_finds_double_forks_whose_middle_process_left_no_trace(self):
        """An orphan is found by the run's id even when the middle process that left it
        vanished without a zombie in the tree: reaped by the main process, or reaped by the
        kernel because the main process ignores SIGCHLD or sets SA_NOCLDWAIT (an idiom of
        servers that want no zombies; it leaves no mark in /proc, so the tree alone cannot
        tell that a stop must look further)."""
        script = ("import ctypes, os, signal, sys, time\n"
                  "if sys.argv[1] == 'ignore': signal.signal(signal.SIGCHLD, signal.SIG_IGN)\n"
                  "if sys.argv[1] == 'nocldwait':\n"
                  "    class Action(ctypes.Structure):\n"
                  "        _fields_ = [('handler', ctypes.c_void_p), ('mask', ctypes.c_ulong * 16),\n"
                  "                    ('flags', ctypes.c_int), ('restorer', ctypes.c_void_p)]\n"
                  "    action = Action(handler=0, flags=2)\n"      # SIG_DFL with SA_NOCLDWAIT
                  "    ctypes.CDLL(None).sigaction(signal.SIGCHLD, ctypes.byref(action), None)\n"
                  "middle = os.fork()\n"
                  "if middle == 0:\n"
                  "    os.setsid()\n"
                  "    if os.fork() != 0:\n"
                  "        os._exit(0)\n"
                  "    with open(sys.argv[2], 'w') as f: f.write(str(os.getpid()))\n"
                  "    time.sleep(999)\n"
                  "if sys.argv[1] == 'reap': os.waitpid(middle, 0)\n"
                  "time.sleep(999)\n")
        for how in ("reap", "ignore", "nocldwait"):
            pid_file = os.path.join(self.daemon.home, "orphan-" + how)
            self.daemon.start("sv-orphan-" + how, PY, ["-c", script, how, pid_file])
            orphan = wait_until(lambda: int(read_text(pid_file)) if read_text(pid_file) else None,
                                message="the orphan of " + how)
            leader = self.daemon.process("sv-orphan-" + how)["pid"]
            # The middle process is gone, with no zombie left in the tree to show it.
            wait_until(lambda: read_text("/proc/%d/task/%d/children" % (leader, leader)).split() == [],
                       message="the middle process gone")
            self.assertNotEqual(os.getpgid(orphan), leader)
            self.daemon.post("/api/processes/sv-orphan-%s/stop" % how)
            self.assertFalse(pid_alive(orphan), how)
            self.daemon.request("DELETE", "/api/processes/sv-orphan-" + how)

    def test_an_exit_held_by_a_tracer_never_stops_the_daemon(self):
        """A main process that lets another process ptrace it, and exits while traced, can be
        reaped only once its tracer lets go. The daemon answers meanwhile (a blocking reap
        would stop it for as long as the tracer likes), and handles the exit then."""
        tracer_file = os.path.join(self.daemon.home, "tracer")
        script = ("import ctypes, os, sys, time\n"
                  "libc = ctypes.CDLL(None, use_errno=True)\n"
                  "libc.prctl(0x59616d61, ctypes.c_ulong(2 ** 64 - 1), 0, 0, 0)\n"   # PR_SET_PTRACER, any
                  "leader = os.getpid()\n"
                  "if os.fork() == 0:\n"
                  "    os.setsid()\n"
                  "    if os.fork() == 0:\n"
                  "        seized = libc.ptrace(0x4206, leader, None, None)\n"         # PTRACE_SEIZE
                  "        with open(sys.argv[1] + '.tmp', 'w') as f: f.write('%d %d' % (os.getpid(), seized))\n"
                  "        os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n"
                  "        time.sleep(60)\n"
                  "    os._exit(0)\n"
                  "while not os.path.exists(sys.argv[1]): time.sleep(0.01)\n"
                  "os._exit(7)\n")
        self.daemon.start("sv-traced", PY, ["-c", script, tracer_file], autorestart=False)
        tracer, seized = wait_until(lambda: [int(x) for x in read_text(tracer_file).split()] or None,
                                    message="the tracer")
        self.addCleanup(lambda: pid_alive(tracer) and os.kill(tracer, signal.SIGKILL))
        if seized != 0:
            self.skipTest("ptrace is not allowed here")
        leader = self.daemon.process("sv-traced")["pid"]
        wait_until(lambda: read_text("/proc/%d/stat" % leader).rsplit(")", 1)[-1].split()[:1] == ["Z"],
                   message="the main process exited, held by its tracer")
        for _ in range(3):
            self.assertEqual(self.daemon.get("/api/processes")[0], 200)
        self.assertEqual(self.daemon.process("sv-traced")["pid"], leader)     # not reaped yet
        os.kill(tracer, signal.SIGKILL)
        stopped = self.daemon.wait_status("sv-traced", "stopped")
        self.assertEqual(stopped["last_exit"]["code"], 7)
        self.daemon.request("DELETE", "/api/processes/sv-traced")

    def test_sigterm_trap_is_killed_after_kill_timeout(self):
        script = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(999)"
        created = self.daemon.start("sv-trap", PY, ["-c", script], kill_timeout=300)
        wait_until(lambda: self.daemon.get("/api/logs/sv-trap")[2]["logs"], message="ready line")
        started = time.monotonic()
        self.daemon.post("/api/processes/sv-trap/stop")
        elapsed = time.monotonic() - started
        self.assertFalse(pid_alive(created["process"]["pid"]))
        self.assertGreaterEqual(elapsed, 0.3)
        self.assertEqual(self.daemon.process("sv-trap")["last_exit"]["signal"], "SIGKILL")
        self.daemon.request("DELETE", "/api/processes/sv-trap")

    def test_no_shell_unless_asked(self):
        line = "echo hi-$PM2_INSTANCE_ID; exec sleep 60"
        plain = self.daemon.post("/api/processes", {"name": "sv-plain", "script": line})[2]
        self.assertEqual(plain["process"]["status"], "errored")
        self.assertEqual(plain["process"]["error"], "command %r not found in PATH" % line)
        self.daemon.start("sv-shell", line, shell=True)
        wait_until(lambda: self.daemon.last_line("sv-shell") == "hi-0", message="the shell's output")
        for name in ("sv-plain", "sv-shell"):
            self.daemon.request("DELETE", "/api/processes/" + name)

    def test_child_environment_has_no_daemon_secret(self):
        created = self.daemon.start("sv-env", "sleep", ["60"], env={"APP_MODE": "prod"}, port=3301)
        pid = created["process"]["pid"]

        def environ_after_exec():           # before its exec the child still shows the daemon's
            with open("/proc/%d/environ" % pid, "rb") as handle:
                data = handle.read()
            return data if b"APP_MODE=" in data else None
        environ = dict(item.split(b"=", 1) for item in wait_until(environ_after_exec, message="the exec").split(b"\0")
                       if item)
        self.assertNotIn(b"PMDAEMON_API_KEY", environ)
        self.assertEqual(environ[b"APP_MODE"], b"prod")
        self.assertEqual(environ[b"PORT"], b"3301")
        self.assertEqual(environ[b"SECRET_PROBE"], b"visible")      # ordinary variables are inherited
        self.assertEqual(environ[b"PM2_INSTANCE_ID"], b"0")
        self.daemon.request("DELETE", "/api/processes/sv-env")

    def test_instances_are_named_and_addressed_as_a_group(self):
        created = self.daemon.post("/api/processes", {"name": "sv-grp", "script": "sh", "instances": 3,
                                                      "args": ["-c", "echo copy $PM2_INSTANCE_ID >&2; exec sleep 60"],
                                                      "port": "3400-3405"})[2]
        self.assertEqual([p["name"] for p in created["processes"]], ["sv-grp-0", "sv-grp-1", "sv-grp-2"])
        self.assertEqual([p["port"] for p in created["processes"]], [3400, 3401, 3402])
        self.assertEqual(self.daemon.process("sv-grp-1")["config"]["env"]["PORT"], "3401")
        status, _, stopped = self.daemon.post("/api/processes/sv-grp/stop")
        self.assertEqual(stopped["message"], "Process 'sv-grp' stopped successfully")
        self.assertEqual({p["status"] for p in self.daemon.get("/api/processes/sv-grp")[2]["processes"]}, {"stopped"})
        self.daemon.post("/api/processes/sv-grp/start")
        logs = wait_until(lambda: (lambda body: body if len(body["logs"]) == 6 else None)(
            self.daemon.get("/api/logs/sv-grp?type=stderr&lines=100")[2]), message="two lines per copy")
        self.assertEqual(logs["process"], "sv-grp")
        self.assertEqual(sorted((e["process"], e["message"]) for e in logs["logs"]),
                         sorted([("sv-grp-%d" % i, "copy %d" % i) for i in range(3)] * 2))
        created["processes"] = self.daemon.get("/api/processes/sv-grp")[2]["processes"]
        status, _, body = self.daemon.post("/api/processes/sv-grp/restart", {"instances": 2})
        self.assertEqual(status, 200, body)
        names = [p["name"] for p in self.daemon.get("/api/processes")[2]["processes"] if p["name"].startswith("sv-grp")]
        self.assertEqual(names, ["sv-grp-0", "sv-grp-1"])
        pids = [p["pid"] for p in created["processes"]]
        self.assertFalse(pid_alive(pids[2]))
        self.daemon.post("/api/processes/sv-grp/restart", {"instances": 4})
        group = self.daemon.get("/api/processes/sv-grp")[2]
        self.assertEqual([(p["name"], p["port"], p["status"]) for p in group["processes"]],
                         [("sv-grp-%d" % i, 3400 + i, "online") for i in range(4)])
        self.assertEqual([p["restarts"] for p in group["processes"]], [2, 2, 0, 0])
        pids += [p["pid"] for p in group["processes"]]
        self.daemon.request("DELETE", "/api/processes/sv-grp")
        self.assertEqual([pid_alive(pid) for pid in pids], [False] * 7)
        self.assertIsNone(self.daemon.process("sv-grp-0"))


HEALTH_SERVER = """
import http.server, os, sys, time
time.sleep(float(os.environ.get('DELAY', '0')))
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        sick = os.path.exists(os.environ.get('SICK_FILE', '/nonexistent'))
        self.send_response(503 if sick else 200)
        self.send_header('Content-Length', '2')
        self.end_headers()
        self.wfile.write(b'ok')
    def log_message(self, *args):
        pass
http.server.HTTPServer(('127.0.0.1', int(os.environ['PORT'])), Handler).serve_forever()
"""


class TestHealthReadinessAndLimits(DaemonTestCase):
    """Health checks, readiness, rolling reload, dependencies, limits, ports, rotation."""

    def events(self, client, count, name):
        return [client.recv_message("process_event", match=lambda m: m["data"]["process"] == name)["data"]["event"]
                for _ in range(count)]

    def test_http_health_check_goes_unhealthy_and_restarts(self):
        sick = os.path.join(self.daemon.home, "sick-http")
        client = self.ws()
        created = self.daemon.start("hc-http", PY, ["-c", HEALTH_SERVER], port="auto:21000-21999",
                                    env={"SICK_FILE": sick},
                                    health_check={"type": "http", "url": "http://127.0.0.1:{port}/health",
                                                  "interval": 200, "timeout": 1000, "retries": 2})
        port = created["process"]["port"]
        healthy = wait_until(lambda: (lambda h: h if h["status"] == "healthy" else None)(
            self.daemon.get("/api/processes/hc-http/health")[2]["health"]), message="healthy")
        self.assertEqual(healthy["check_type"], "http")
        self.assertEqual(healthy["url"], "http://127.0.0.1:%d/health" % port)
        self.assertEqual(healthy["success_rate"], 100.0)
        self.assertGreaterEqual(healthy["total_checks"], 1)
        self.assertRegex(healthy["last_check"], r"Z$")
        self.assertEqual(self.daemon.process("hc-http")["health"], "healthy")
        update = client.recv_message("health_update", match=lambda m: m["data"]["process"] == "hc-http")
        self.assertEqual(update["data"]["status"], "healthy")
        open(sick, "w").close()
        client.recv_message("process_event", timeout=10, match=lambda m: m["data"]["process"] == "hc-http"
                            and m["data"]["event"] == "unhealthy")
        os.unlink(sick)
        restarted = wait_until(lambda: (lambda p: p if p["restarts"] >= 1 and p["health"] == "healthy" else None)(
            self.daemon.process("hc-http")), message="restart after unhealthy")
        self.assertNotEqual(restarted["pid"], created["process"]["pid"])
        health = self.daemon.get("/api/processes/hc-http/health")[2]["health"]
        self.assertLess(health["success_rate"], 100.0)
        self.assertGreaterEqual(health["total_checks"], health["successful_checks"] + 2)
        self.daemon.request("DELETE", "/api/processes/hc-http")

    def test_tcp_and_script_checks(self):
        self.daemon.start("hc-tcp", PY, ["-c", HEALTH_SERVER], port="auto:22000-22999",
                          health_check={"type": "tcp", "interval": 200})
        self.daemon.start("hc-deaf", "sleep", ["60"], restart_on_unhealthy=False,
                          health_check={"type": "tcp", "port": 1, "interval": 100, "retries": 2})
        self.daemon.start("hc-script", "sleep", ["60"],
                          health_check={"type": "script", "script": "sh", "args": ["-c", "exit 3"],
                                        "interval": 100, "retries": 1}, restart_on_unhealthy=False)
        wait_until(lambda: self.daemon.process("hc-tcp")["health"] == "healthy", message="tcp healthy")
        deaf = wait_until(lambda: (lambda h: h if h["status"] == "unhealthy" else None)(
            self.daemon.get("/api/processes/hc-deaf/health")[2]["health"]), message="tcp unhealthy")
        self.assertGreaterEqual(deaf["consecutive_failures"], 2)
        self.assertTrue(deaf["last_error"].startswith("ConnectionRefusedError"), deaf["last_error"])
        self.assertEqual(self.daemon.process("hc-deaf")["status"], "online")    # restart_on_unhealthy off
        script = wait_until(lambda: (lambda h: h if h["status"] == "unhealthy" else None)(
            self.daemon.get("/api/processes/hc-script/health")[2]["health"]), message="script unhealthy")
        self.assertEqual(script["last_error"], "exit code 3")
        for name in ("hc-tcp", "hc-deaf", "hc-script"):
            self.daemon.request("DELETE", "/api/processes/" + name)

    def test_wait_ready_keeps_starting_until_healthy(self):
        created = self.daemon.start("hc-ready", PY, ["-c", HEALTH_SERVER], port="auto:23000-23999",
                                    env={"DELAY": "0.6"}, wait_ready=True,
                                    health_check={"type": "tcp", "interval": 5000})
        self.assertEqual(created["process"]["status"], "starting")
        self.assertEqual(self.daemon.process("hc-ready")["status"], "starting")
        online = self.daemon.wait_status("hc-ready", "online")
        self.assertEqual(online["health"], "healthy")
        self.daemon.request("DELETE", "/api/processes/hc-ready")

    def test_listen_timeout_makes_a_never_ready_process_online(self):
        self.daemon.start("hc-late", "sleep", ["60"], wait_ready=True, listen_timeout=400,
                          restart_on_unhealthy=False, health_check={"type": "tcp", "port": 1, "interval": 5000})
        self.assertEqual(self.daemon.process("hc-late")["status"], "starting")
        online = self.daemon.wait_status("hc-late", "online")
        self.assertEqual(online["health"], "unknown")
        notes = [e["message"] for e in self.daemon.get("/api/logs/hc-late?type=stderr")[2]["logs"]]
        self.assertIn("[pmdaemon] no healthy check within listen_timeout (400 ms); considered online", notes)
        self.daemon.request("DELETE", "/api/processes/hc-late")

    def test_rolling_reload_keeps_n_minus_one_copies_ready(self):
        self.daemon.post("/api/processes", {"name": "hc-roll", "script": PY, "args": ["-c", HEALTH_SERVER],
                                            "instances": 3, "port": "auto:24000-24999", "wait_ready": True,
                                            "env": {"DELAY": "0.1"},
                                            "health_check": {"type": "tcp", "interval": 5000}})
        def ready_copies():
            listing = self.daemon.get("/api/processes")[2]["processes"]
            return [p for p in listing if p["name"].startswith("hc-roll-") and p["status"] == "online"
                    and p["health"] == "healthy"]
        wait_until(lambda: len(ready_copies()) == 3, message="three ready copies")
        before = {p["name"]: p["pid"] for p in ready_copies()}
        import threading
        result = {}
        reload_thread = threading.Thread(target=lambda: result.update(
            response=self.daemon.post("/api/processes/hc-roll/reload")))
        reload_thread.start()
        seen = []
        while reload_thread.is_alive():
            seen.append(len(ready_copies()))
        reload_thread.join()
        status, _, body = result["response"]
        self.assertEqual((status, body["message"]), (200, "Process 'hc-roll' reloaded successfully"))
        self.assertGreaterEqual(min(seen), 2, seen)
        self.assertIn(2, seen)                      # the poll did see copies being replaced
        after = {p["name"]: p["pid"] for p in ready_copies()}
        self.assertEqual(sorted(after), sorted(before))
        self.assertTrue(all(after[name] != before[name] for name in before))
        self.daemon.request("DELETE", "/api/processes/hc-roll")

    def test_depends_on_orders_the_start(self):
        self.assertError(self.daemon.post("/api/processes", {"name": "dep-x", "script": "sleep", "depends_on": ["nope"]}),
                         400, "VALIDATION_ERROR", "depends_on names an unknown process 'nope'")
        self.assertError(self.daemon.post("/api/processes", {"name": "dep-x", "script": "sleep", "depends_on": ["dep-x"]}),
                         400, "VALIDATION_ERROR", "depends_on forms a cycle: dep-x -> dep-x")
        self.daemon.start("dep-db", PY, ["-c", HEALTH_SERVER], port="auto:25000-25999", env={"DELAY": "0.6"},
                          wait_ready=True, health_check={"type": "tcp", "interval": 5000})
        app = self.daemon.start("dep-app", "sleep", ["60"], depends_on=["dep-db"])
        self.assertEqual((app["process"]["status"], app["process"]["pid"]), ("starting", None))
        self.assertEqual(self.daemon.process("dep-app")["waiting_for"], ["dep-db"])
        online = self.daemon.wait_status("dep-app", "online")
        db = self.daemon.process("dep-db")
        self.assertEqual(db["status"], "online")
        self.assertGreaterEqual(online["started_at"], db["started_at"])
        for name in ("dep-app", "dep-db"):
            self.daemon.request("DELETE", "/api/processes/" + name)

    def test_memory_limit_restarts_the_process(self):
        client = self.ws()
        script = "import time\nblock = bytearray(80 * 1024 * 1024)\nblock[::4096] = b'x' * len(block[::4096])\ntime.sleep(60)"
        self.daemon.start("mem-hog", PY, ["-c", script], max_memory_restart="40M")
        event = client.recv_message("process_event", timeout=15, match=lambda m: m["data"]["process"] == "mem-hog"
                                    and m["data"]["event"] == "memory_limit")
        self.assertTrue(event["data"]["reason"].startswith("memory "), event)
        self.assertGreater(event["data"]["memory"], 40 * 1024 * 1024)
        wait_until(lambda: self.daemon.process("mem-hog")["restarts"] >= 1, message="memory restart")
        self.daemon.request("DELETE", "/api/processes/mem-hog")

    def test_ports_auto_range_and_conflicts(self):
        blocker = socket.socket()
        self.addCleanup(blocker.close)
        for taken in range(27000, 28000):          # below the ephemeral range, so nothing else moves
            try:
                blocker.bind(("127.0.0.1", taken))
                break
            except OSError:
                continue
        blocker.listen()
        first = self.daemon.start("port-a", "sleep", ["60"], port="auto:%d-%d" % (taken, taken + 50))
        self.assertGreater(first["process"]["port"], taken)              # the OS-taken port is skipped
        second = self.daemon.start("port-b", "sleep", ["60"], port="auto:%d-%d" % (taken, taken + 50))
        self.assertGreater(second["process"]["port"], first["process"]["port"])   # and the managed one
        self.assertLessEqual(second["process"]["port"], taken + 50)
        self.assertError(self.daemon.post("/api/processes", {"name": "port-c", "script": "sleep",
                                                             "port": first["process"]["port"]}), 409, "PORT_CONFLICT")
        self.assertError(self.daemon.post("/api/processes", {"name": "port-d", "script": "sleep",
                                                             "port": "4000-4001", "instances": 3}),
                         400, "VALIDATION_ERROR", "port range '4000-4001' holds 2 port(s) but instances is 3")
        for name in ("port-a", "port-b"):
            self.daemon.request("DELETE", "/api/processes/" + name)

    def test_logs_rotate_and_reads_cross_the_boundary(self):
        script = "import sys\nfor i in range(40000): sys.stdout.write('line %06d %s\\n' % (i, 'y' * 60))\n" \
                 "sys.stdout.flush()\nimport time; time.sleep(60)"
        self.daemon.start("rot", PY, ["-c", script], log_max_size="256K", log_max_files=3)
        wait_until(lambda: self.daemon.last_line("rot").startswith("line 039999"), message="last line")
        files = sorted(f for f in os.listdir(os.path.join(self.daemon.home, "logs")) if f.startswith("rot-out.log"))
        self.assertEqual(files, ["rot-out.log", "rot-out.log.1", "rot-out.log.2"])
        for name in files:
            self.assertLessEqual(os.path.getsize(os.path.join(self.daemon.home, "logs", name)), 256 * 1024)
        current_lines = read_text(os.path.join(self.daemon.home, "logs", "rot-out.log")).count("\n")
        logs = self.daemon.get("/api/logs/rot?type=stdout&lines=%d" % (current_lines + 100))[2]["logs"]
        self.assertEqual(len(logs), current_lines + 100)
        numbers = [int(entry["message"].split()[1]) for entry in logs]
        self.assertEqual(numbers, list(range(40000 - len(logs), 40000)))
        self.daemon.request("DELETE", "/api/processes/rot")

    def test_partial_and_binary_output_reach_the_log(self):
        script = ("import sys, time\nsys.stdout.buffer.write(b'bin \\xff\\x00\\xfe end\\n')\n"
                  "sys.stdout.buffer.write(b'prompt> ')\nsys.stdout.flush()\ntime.sleep(60)")
        self.daemon.start("partial", PY, ["-c", script])
        logs = wait_until(lambda: (lambda entries: entries if len(entries) == 2 else None)(
            self.daemon.get("/api/logs/partial?type=stdout")[2]["logs"]), message="the unterminated line")
        self.assertEqual([e["message"] for e in logs], ["bin \ufffd\ufffd\ufffd end", "prompt> "])
        self.daemon.request("DELETE", "/api/processes/partial")

    def test_backoff_shows_restarting_with_the_next_try(self):
        self.daemon.start("boff", PY, ["-c", "raise SystemExit(1)"], exp_backoff_restart_delay=1500)
        waiting = wait_until(lambda: (lambda p: p if p["status"] == "restarting" else None)(self.daemon.process("boff")),
                             message="restarting status")
        self.assertRegex(waiting["next_restart_at"], r"^\d{4}-.*Z$")
        self.assertIsNone(waiting["pid"])
        self.daemon.request("DELETE", "/api/processes/boff")

    def test_stop_exit_code_means_no_restart(self):
        self.daemon.start("done", PY, ["-c", "raise SystemExit(3)"], stop_exit_codes=[3])
        stopped = self.daemon.wait_status("done", "stopped")
        self.assertEqual((stopped["restarts"], stopped["last_exit"]["code"]), (0, 3))
        self.daemon.request("DELETE", "/api/processes/done")


class TestHealthCheckScript(DaemonTestCase):
    def test_only_a_tail_of_a_check_scripts_output_is_kept(self):
        """96 MiB on stderr (the attack wrote 390): the daemon's peak memory does not grow by it."""
        directory = temp_dir(self, "pmd-check-")
        script = write_script(os.path.join(directory, "check.sh"),
                              "head -c 100663296 /dev/zero | tr '\\0' x >&2; echo 'disk full' >&2; exit 3")

        def peak_kib():
            with open("/proc/%d/status" % self.daemon.proc.pid) as handle:
                return int(re.search(r"VmHWM:\s+(\d+) kB", handle.read()).group(1))
        before = peak_kib()
        self.daemon.start("loud-check", "sleep", ["60"], health_check={"type": "script", "script": script,
                                                                       "interval": 1000, "timeout": 60000})
        self.addCleanup(self.daemon.request, "DELETE", "/api/processes/loud-check")
        health = wait_until(lambda: self.daemon.get("/api/processes/loud-check/health")[2]["health"]["last_error"],
                            30, message="the check's result")
        self.daemon.request("DELETE", "/api/processes/loud-check")
        self.assertEqual(health, "exit code 3: " + "x" * 190 + "disk full")
        self.assertLess(peak_kib() - before, 32 * 1024)


class TestWatchLimits(DaemonTestCase):
    def test_file_snapshot_counts_directories_and_files(self):
        directory = temp_dir(self, "pmd-watch-")
        for index in range(3):
            os.mkdir(os.path.join(directory, "d%d" % index))
            open(os.path.join(directory, "f%d" % index), "w").close()
        self.assertEqual(len(pmdaemon.file_snapshot([directory], [], limit=3, max_dirs=4)), 3)
        with self.assertRaises(ValueError) as caught:
            pmdaemon.file_snapshot([directory], [], limit=3, max_dirs=3)
        self.assertEqual(str(caught.exception), "more than 3 directories to watch")
        with self.assertRaises(ValueError) as caught:
            pmdaemon.file_snapshot([directory], [], limit=2, max_dirs=4)
        self.assertEqual(str(caught.exception), "more than 2 files to watch")

    def test_too_many_directories_stop_watching_and_say_why(self):
        directory = temp_dir(self, "pmd-watch-")
        for index in range(pmdaemon.WATCH_MAX_DIRS + 1):
            os.mkdir(os.path.join(directory, "d%d" % index))
        self.daemon.start("watch-dirs", "sleep", ["60"], cwd=directory, watch=True)
        self.addCleanup(self.daemon.request, "DELETE", "/api/processes/watch-dirs")
        reason = "more than %d directories to watch" % pmdaemon.WATCH_MAX_DIRS
        watching = wait_until(lambda: self.daemon.process("watch-dirs")["watching"].get("stopped"), 30,
                              message="watching to stop")
        self.assertEqual(watching, reason)
        logs = self.daemon.get("/api/logs/watch-dirs?type=stderr")[2]["logs"]
        self.assertEqual(logs[-1]["message"], "[pmdaemon] stopped watching files: %s (add watch_ignore patterns)"
                         % reason)
        log_text = read_text(os.path.join(self.daemon.home, "pmdaemon.log"))
        self.assertIn("watch-dirs: stopped watching files: " + reason, log_text)
        self.assertIn("watch-dirs watch_stopped reason=" + reason, log_text)


class TestStdinWrites(DaemonTestCase):
    def test_one_pending_write_per_process_the_others_409(self):
        self.daemon.start("stdin-busy", "sleep", ["60"], stdin=True)      # never reads its stdin
        self.addCleanup(self.daemon.request, "DELETE", "/api/processes/stdin-busy")
        data = "x" * pmdaemon.MAX_STDIN_WRITE
        for _ in range(16):     # the pipe takes 64 KiB (3.6: a socket pair, ~200 KiB); then writes wait in ours
            result = self.daemon.post("/api/processes/stdin-busy/stdin", {"data": data})
            if result[0] != 200:
                break
        self.assertError(result, 409, "STDIN_BUSY", "Process 'stdin-busy' has not read the previous stdin write yet")


# ----------------------------------------------------------------------------------------------
# 7. HTTP/1.1 codec
# ----------------------------------------------------------------------------------------------

def parse_all(data, byte_by_byte=False):
    """Feed data whole or one byte at a time; return the complete requests."""
    parser = pmdaemon.RequestParser()
    requests = []
    pieces = [data[i:i + 1] for i in range(len(data))] if byte_by_byte else [data]
    for piece in pieces:
        parser.feed(piece)
        while True:
            request = parser.next_request()
            if request is None:
                break
            requests.append(request)
    return requests, parser


class TestHttpParser(unittest.TestCase):
    def both(self, data):
        whole, _ = parse_all(data)
        split, _ = parse_all(data, byte_by_byte=True)
        self.assertEqual([(r.method, r.path, r.query, r.body, r.headers) for r in whole],
                         [(r.method, r.path, r.query, r.body, r.headers) for r in split])
        return whole

    def assertRejected(self, data, status, message=None):
        for byte_by_byte in (False, True):
            with self.assertRaises(pmdaemon.PMDaemonError) as caught:
                parse_all(data, byte_by_byte)
            self.assertEqual(caught.exception.status, status, (data[:80], caught.exception.message))
            self.assertTrue(caught.exception.close)
            if message is not None:
                self.assertEqual(caught.exception.message, message)

    def test_pipelined_requests_with_both_body_framings(self):
        data = (b"GET /api/processes?x=1 HTTP/1.1\r\nHost: localhost\r\n\r\n"
                b"POST /api/processes HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
                b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nTrailer: x\r\n\r\n"
                b"GET / HTTP/1.0\r\n\r\n")
        requests = self.both(data)
        self.assertEqual([r.method for r in requests], ["GET", "POST", "POST", "GET"])
        self.assertEqual(requests[0].path, "/api/processes")
        self.assertEqual(requests[0].query, "x=1")
        self.assertEqual(requests[1].body, b"hello")
        self.assertEqual(requests[2].body, b"Wikipedia")
        self.assertEqual([r.keep_alive for r in requests], [True, True, True, False])

    def test_keep_alive_rules_and_lf_only_lines(self):
        requests = self.both(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                             b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
                             b"\r\nGET /lf HTTP/1.1\nHost: a\n\n")
        self.assertEqual([r.keep_alive for r in requests], [True, False, True])
        self.assertEqual(requests[2].path, "/lf")

    def test_header_values_and_percent_decoding(self):
        request = self.both(b"GET /api/logs/my%2Dapp HTTP/1.1\r\nHost: a\r\nX-Thing:   spaced value \t\r\n\r\n")[0]
        self.assertEqual(request.path, "/api/logs/my-app")
        self.assertEqual(request.header("x-thing"), "spaced value")

    def test_malformed_requests_get_their_status(self):
        cases = [
            (b"GET /\r\n\r\n", 400, "malformed request line 'GET /'"),
            (b"GET / HTTP/1.1\r\n\r\n", 400, "missing Host header (required by HTTP/1.1)"),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "more than one Host header"),
            (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400, "whitespace before the colon in header 'Host'"),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n  folded\r\n\r\n", 400,
             "obsolete line folding in headers is not allowed"),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400,
             "invalid character (CR, LF, NUL or control) in header 'X'"),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400, None),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\n", 400, "invalid Content-Length '1x'"),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400,
             "conflicting Content-Length values"),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400,
             "Content-Length together with Transfer-Encoding"),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501,
             "transfer coding 'gzip' is not supported"),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400,
             "invalid chunk size line 'zz'"),
            (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505, "HTTP/2.0 is not supported; use HTTP/1.1"),
            (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 2000000\r\n\r\n", 413,
             "request body of 2000000 bytes is larger than the 1048576 byte limit"),
            (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n", 414, "request line is longer than 8192 bytes"),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 17000, 431, "header block is larger than 16384 bytes"),
            (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: 1\r\n" * 101 + b"\r\n", 431, "more than 100 header fields"),
            (b"GET http:/bad HTTP/1.1\r\nHost: a\r\n\r\n", 400, None),
            (b"GET nope HTTP/1.1\r\nHost: a\r\n\r\n", 400, "invalid request target 'nope'"),
        ]
        for data, status, message in cases:
            with self.subTest(data=data[:60]):
                self.assertRejected(data, status, message)

    def test_strict_framing_rfc9112(self):
        chunked = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        cases = [
            (chunked + b"2\nab\r\n0\r\n\r\n", "bare LF in chunked framing (CRLF required)"),
            (chunked + b"2\r\nab\n0\r\n\r\n", "chunk data not followed by CRLF"),
            (chunked + b"2\r\nab\r\n0\n\r\n", "bare LF in chunked framing (CRLF required)"),
            (chunked + b"2\r\nab\r\n0\r\n\n", "bare LF in chunked framing (CRLF required)"),
            (chunked + b" 2\r\nab\r\n0\r\n\r\n", "invalid chunk size line ' 2'"),
            (chunked + b"2 \r\nab\r\n0\r\n\r\n", "invalid chunk size line '2 '"),
            (chunked + b"2\t\r\nab\r\n0\r\n\r\n", "invalid chunk size line '2\\t'"),
            (chunked + b"2;a\x01b\r\nab\r\n0\r\n\r\n", "invalid chunk size line '2;a\\x01b'"),
            (chunked + b"2;=x\r\nab\r\n0\r\n\r\n", "invalid chunk size line '2;=x'"),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \xa05\r\n\r\nhello", "invalid Content-Length '\\xa05'"),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\x85\r\n\r\nhello", "invalid Content-Length '5\\x85'"),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\xa0\r\n\r\n", None),
        ]
        for data, message in cases:
            with self.subTest(data=data[-30:]):
                self.assertRejected(data, 501 if message is None else 400, message)
        self.assertRejected(chunked + b"1\r\na\r\n" * 1025, 413, "chunked request body has more than 1024 chunks")
        # What the grammar allows is accepted: extensions with BWS, quoted values.
        body = self.both(chunked + b'2 ; name = "q\\"x" ;flag\r\nab\r\n0\r\n\r\n')[0].body
        self.assertEqual(body, b"ab")

    def test_each_request_gets_fresh_body_state(self):
        trailer = b"T: " + b"x" * 6000 + b"\r\n"
        one = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nz\r\n0\r\n" + trailer + b"\r\n"
        requests = self.both(one * 4)
        self.assertEqual([r.body for r in requests], [b"z"] * 4)

    def test_garbage_is_refused_before_the_head_ends(self):
        for data in (b"\x16\x03\x01\x02\x00", b"GET / HTTP/1.1\r\x00", b"GE T / HTTP/1.1\r\nHost: a"):
            with self.subTest(data=data):
                self.assertRejected(data, 400)

    def test_chunked_body_limit_is_decided_from_the_chunk_size(self):
        self.assertRejected(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n200000\r\n", 413)

    def test_absolute_form_target(self):
        request = self.both(b"GET http://localhost:9615/api/system?a=b HTTP/1.1\r\nHost: localhost\r\n\r\n")[0]
        self.assertEqual((request.path, request.query), ("/api/system", "a=b"))

    def test_response_serialisation(self):
        response = pmdaemon.json_response(201, {"a": 1})
        raw = pmdaemon.serialize_response(response, b"Thu, 01 Jan 1970 00:00:00 GMT", keep_alive=True)
        head, body = raw.split(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 201 Created\r\n"))
        for line in (b"Content-Type: application/json", b"Content-Length: 7", b"X-Content-Type-Options: nosniff",
                     b"X-Frame-Options: DENY", b"X-XSS-Protection: 1; mode=block"):
            self.assertIn(line, head.split(b"\r\n"))
        self.assertEqual(body, b'{"a":1}')
        head_only = pmdaemon.serialize_response(response, b"d", keep_alive=False, head_only=True)
        self.assertTrue(head_only.endswith(b"Connection: close\r\n\r\n"))
        self.assertIn(b"Content-Length: 7", head_only)
        no_content = pmdaemon.serialize_response(pmdaemon.Response(204), b"d", keep_alive=True, http10=True)
        self.assertNotIn(b"Content-Length", no_content)
        self.assertIn(b"Connection: keep-alive", no_content)


# ----------------------------------------------------------------------------------------------
# 8. WebSocket codec
# ----------------------------------------------------------------------------------------------

MASK = b"\x37\xfa\x21\x3d"


def client_frame(opcode, payload=b"", fin=True, rsv=0, mask=MASK):
    frame = bytearray(pmdaemon.encode_frame(opcode, payload, fin, mask))
    frame[0] |= rsv << 4
    return bytes(frame)


class TestWsCodec(unittest.TestCase):
    def feed(self, data, byte_by_byte=False, max_message=pmdaemon.MAX_WS_MESSAGE):
        protocol = pmdaemon.WsProtocol(max_message)
        events = []
        pieces = [data[i:i + 1] for i in range(len(data))] if byte_by_byte else [data]
        for piece in pieces:
            events.extend(protocol.receive_data(piece))
        return events, protocol

    def both(self, data):
        whole = self.feed(data)
        split = self.feed(data, byte_by_byte=True)
        self.assertEqual(whole[0], split[0])
        self.assertEqual(whole[1].outgoing, split[1].outgoing)
        return whole

    def assertCloses(self, data, code, message):
        for byte_by_byte in (False, True):
            events, protocol = self.feed(data, byte_by_byte)
            self.assertEqual(events[-1].kind, "error", events)
            self.assertEqual(events[-1].data.close_code, code)
            self.assertEqual(str(events[-1].data), message)
            self.assertTrue(protocol.failed)

    def test_frames_per_message_are_bounded_even_when_empty(self):
        empties = client_frame(1, b"", fin=False) + client_frame(0, b"", fin=False) * 4096
        self.assertCloses(empties, 1008, "message in more than 4096 frames")
        events, _ = self.feed(client_frame(1, b"a", fin=False) + client_frame(0, b"", fin=False) * 4094
                              + client_frame(0, b"b"))
        self.assertEqual(events, [pmdaemon.WsEvent("text", "ab")])      # 4096 frames: still fine

    def test_rfc6455_accept_key_vector(self):           # RFC 6455 §1.3
        self.assertEqual(pmdaemon.ws_accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")

    def test_rfc6455_section_5_7_examples(self):
        self.assertEqual(pmdaemon.encode_frame(pmdaemon.Opcode.TEXT, b"Hello"), b"\x81\x05\x48\x65\x6c\x6c\x6f")
        events, _ = self.both(b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58")      # masked "Hello"
        self.assertEqual(events, [pmdaemon.WsEvent("text", "Hello")])
        events, _ = self.both(client_frame(1, b"Hel", fin=False)
                              + client_frame(0, b"lo"))
        self.assertEqual(events, [pmdaemon.WsEvent("text", "Hello")])
        events, protocol = self.both(client_frame(9, b"Hello"))
        self.assertEqual(protocol.outgoing, [b"\x8a\x05\x48\x65\x6c\x6c\x6f"])       # unmasked pong
        self.assertEqual(pmdaemon.encode_frame(2, b"\x00" * 256)[:4], b"\x82\x7e\x01\x00")
        self.assertEqual(pmdaemon.encode_frame(2, b"\x00" * 65536)[:10], b"\x82\x7f" + struct.pack("!Q", 65536))

    def test_fragmentation_with_interleaved_ping(self):
        data = client_frame(1, b"fra", fin=False) + client_frame(9, b"p") + client_frame(0, b"gm", fin=False) \
            + client_frame(0, b"ent")
        events, protocol = self.both(data)
        self.assertEqual(events, [pmdaemon.WsEvent("ping", b"p"), pmdaemon.WsEvent("text", "fragment")])
        self.assertEqual(protocol.outgoing, [pmdaemon.encode_frame(10, b"p")])

    def test_utf8_split_across_fragments(self):
        text = "κόσμε".encode()
        events, _ = self.both(client_frame(1, text[:3], fin=False) + client_frame(0, text[3:]))
        self.assertEqual(events, [pmdaemon.WsEvent("text", "κόσμε")])

    def test_protocol_violations_and_their_close_codes(self):
        cases = [
            (pmdaemon.encode_frame(1, b"hi"), 1002, "client frame is not masked"),
            (client_frame(1, b"x", rsv=1), 1002, "reserved bits set without a negotiated extension"),
            (client_frame(3), 1002, "unknown opcode 3"),
            (client_frame(9, b"x", fin=False), 1002, "fragmented control frame"),
            (client_frame(9, b"x" * 126), 1002, "control frame payload larger than 125 bytes"),
            (client_frame(0, b"x"), 1002, "continuation frame without a message to continue"),
            (client_frame(1, b"a", fin=False) + client_frame(1, b"b"), 1002,
             "new data frame inside a fragmented message"),
            (client_frame(1, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80"), 1007,
             "invalid UTF-8 in text message"),
            (client_frame(8, b"\x03"), 1002, "close frame with a 1-byte payload"),
            (client_frame(8, struct.pack("!H", 1005)), 1002, "invalid close code 1005"),
            (client_frame(8, struct.pack("!H", 999)), 1002, "invalid close code 999"),
            (client_frame(8, struct.pack("!H", 1000) + b"\xff"), 1007, "invalid UTF-8 in close reason"),
        ]
        for data, code, message in cases:
            with self.subTest(message=message):
                self.assertCloses(data, code, message)

    def test_invalid_utf8_fails_fast_before_the_message_ends(self):
        events = pmdaemon.WsProtocol().receive_data(client_frame(1, b"ok\xff", fin=False))
        self.assertIsInstance(events[-1].data, pmdaemon.InvalidUtf8)

    def test_invalid_utf8_fails_fast_inside_an_incomplete_frame(self):
        frame = client_frame(1, "κόσμε".encode() + b"\xed\xa0\x80" + b"more text" * 10)
        protocol = pmdaemon.WsProtocol()
        events = []
        for index in range(len(frame)):
            events = protocol.receive_data(frame[index:index + 1])
            if events:
                break
        self.assertIsInstance(events[-1].data, pmdaemon.InvalidUtf8)
        self.assertLess(index, 2 + 4 + 13)            # long before the frame's end
        text = "κόσμε".encode()                        # valid text split mid-character still passes
        data = client_frame(1, text[:3], fin=False) + client_frame(0, text[3:] + b"!" * 200)
        self.assertEqual(self.feed(data, byte_by_byte=True)[0], [pmdaemon.WsEvent("text", "κόσμε" + "!" * 200)])

    def test_events_before_a_violation_are_kept(self):
        events, _ = self.feed(client_frame(1, b"valid") + client_frame(1, b"x", rsv=2))
        self.assertEqual(events[0], pmdaemon.WsEvent("text", "valid"))
        self.assertEqual(events[1].data.close_code, 1002)

    def test_too_big_is_decided_from_the_header(self):
        header = b"\x82\xff" + struct.pack("!Q", 2 * 1024 * 1024) + MASK       # no payload sent
        self.assertCloses(header, 1009, "message larger than 1048576 bytes")
        protocol = pmdaemon.WsProtocol(max_message=10)
        protocol.receive_data(client_frame(2, b"x" * 6, fin=False))
        events = protocol.receive_data(client_frame(0, b"x" * 6)[:2])
        self.assertIsInstance(events[-1].data, pmdaemon.MessageTooBig)

    def test_close_is_echoed_once(self):
        events, protocol = self.both(client_frame(8, struct.pack("!H", 1001) + b"bye") + client_frame(1, b"late"))
        self.assertEqual(events, [pmdaemon.WsEvent("close", (1001, "bye"))])
        self.assertEqual(protocol.outgoing, [pmdaemon.encode_close(1001)])
        events, protocol = self.both(client_frame(8))
        self.assertEqual(protocol.outgoing, [b"\x88\x00"])
        self.assertEqual(protocol.close(1000), b"")
        self.assertIs(protocol.state, pmdaemon.WsState.CLOSED)

    def test_closing_handshake_started_by_us(self):
        protocol = pmdaemon.WsProtocol()
        self.assertIs(protocol.state, pmdaemon.WsState.OPEN)
        self.assertEqual(protocol.close(1001, "bye"), pmdaemon.encode_close(1001, "bye"))
        self.assertIs(protocol.state, pmdaemon.WsState.CLOSE_SENT)
        self.assertEqual(protocol.receive_data(client_frame(1, b"late") + client_frame(8, struct.pack("!H", 1001))),
                         [pmdaemon.WsEvent("text", "late"), pmdaemon.WsEvent("close", (1001, ""))])
        self.assertEqual(protocol.outgoing, [])                 # our close is not sent twice
        self.assertIs(protocol.state, pmdaemon.WsState.CLOSED)

    def test_handshake_validation(self):
        def request(**headers):
            base = {"Host": "localhost", "Upgrade": "websocket", "Connection": "Upgrade",
                    "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
            base.update(headers)
            lines = "".join("%s: %s\r\n" % (k, v) for k, v in base.items() if v is not None)
            return parse_all(("GET /ws HTTP/1.1\r\n%s\r\n" % lines).encode())[0][0]
        self.assertEqual(pmdaemon.check_handshake(request()), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        for headers, status in (({"Sec-WebSocket-Version": "8"}, 426), ({"Sec-WebSocket-Key": "c2hvcnQ="}, 400),
                                ({"Upgrade": None}, 400), ({"Connection": "keep-alive"}, 400)):
            with self.assertRaises(pmdaemon.PMDaemonError) as caught:
                pmdaemon.check_handshake(request(**headers))
            self.assertEqual(pmdaemon.wire_error(caught.exception).status, status, headers)
        with self.assertRaises(pmdaemon.PMDaemonError) as caught:
            pmdaemon.check_handshake(request(**{"Sec-WebSocket-Version": "8"}))
        self.assertEqual(caught.exception.headers, (("Sec-WebSocket-Version", "13"),))


    def test_client_side_reads_unmasked_frames_and_masks_its_own(self):
        data = (pmdaemon.encode_frame(1, "héllo".encode()) + pmdaemon.encode_frame(9, b"hi")
                + pmdaemon.encode_frame(1, b"x" * 300, fin=False) + pmdaemon.encode_frame(0, b"y")
                + pmdaemon.encode_close(1001, "bye"))
        for byte_by_byte in (False, True):
            protocol = pmdaemon.WsProtocol(client=True)
            pieces = [data[i:i + 1] for i in range(len(data))] if byte_by_byte else [data]
            events = [event for piece in pieces for event in protocol.receive_data(piece)]
            self.assertEqual(events, [pmdaemon.WsEvent("text", "héllo"), pmdaemon.WsEvent("ping", b"hi"),
                                      pmdaemon.WsEvent("text", "x" * 300 + "y"), pmdaemon.WsEvent("close", (1001, "bye"))])
            pong, close = protocol.outgoing
            self.assertEqual((pong[:2], close[:2]), (b"\x8a\x82", b"\x88\x82"))      # masked, RFC 6455 §5.3
            self.assertEqual(pmdaemon.WsProtocol().receive_data(pong), [pmdaemon.WsEvent("pong", b"hi")])
        text = pmdaemon.WsProtocol(client=True).frame(1, b"cmd")
        self.assertEqual(pmdaemon.WsProtocol().receive_data(text), [pmdaemon.WsEvent("text", "cmd")])

    def test_client_side_refuses_masked_frames_and_bad_text(self):
        protocol = pmdaemon.WsProtocol(client=True)
        error = protocol.receive_data(client_frame(1, b"masked"))[-1]
        self.assertEqual((error.kind, str(error.data), error.data.close_code), ("error", "server frame is masked", 1002))
        partial = pmdaemon.encode_frame(1, b"ok \xff and more")[:6]        # fails before the frame is whole
        error = pmdaemon.WsProtocol(client=True).receive_data(partial)[-1]
        self.assertEqual((error.kind, str(error.data)), ("error", "invalid UTF-8 in text message"))

    def test_client_handshake_and_its_reply(self):
        request, key = pmdaemon.client_handshake("/ws", "localhost:1", {"X-API-Key": "k", "Sec-WebSocket-Version": ""})
        parsed = parse_all(request)[0][0]
        self.assertEqual((parsed.header("x-api-key"), parsed.header("sec-websocket-version")), ("k", None))
        self.assertEqual(parsed.header("sec-websocket-key"), key)
        good = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: %s" % (
            pmdaemon.ws_accept_key(key).encode())
        self.assertEqual(pmdaemon.check_handshake_reply(good, key), 101)
        self.assertEqual(pmdaemon.check_handshake_reply(b"HTTP/1.1 403 Forbidden\r\nX: y", key), 403)
        for head, message in ((good.replace(b"Accept: ", b"Accept: x"), "101 without the Sec-WebSocket-Accept of our key"),
                              (good.replace(b"websocket", b"h2c"), "101 without 'Upgrade: websocket'"),
                              (b"SSH-2.0-OpenSSH", "not an HTTP answer: b'SSH-2.0-OpenSSH'")):
            with self.assertRaises(pmdaemon.WebSocketError) as caught:
                pmdaemon.check_handshake_reply(head, key)
            self.assertEqual(str(caught.exception), message)


# ----------------------------------------------------------------------------------------------
# 9. API
# ----------------------------------------------------------------------------------------------

# -- in-process: a route that fails ------------------------------------------------------------

class TestInternalErrors(unittest.TestCase):
    def test_a_failing_handler_answers_500_without_details(self):
        import asyncio
        home = temp_dir(self)

        async def scenario():
            api = pmdaemon.Api(pmdaemon.Supervisor(home), pmdaemon.AccessPolicy(None))

            async def broken(request):
                raise KeyError("secret internal detail")
            api.routes.insert(0, pmdaemon.Route("GET", pmdaemon.compile_route("/api/boom"), broken))
            request = parse_all(b"GET /api/boom HTTP/1.1\r\nHost: localhost\r\n\r\n")[0][0]
            return await api.handle(request)
        with self.assertLogs("pmdaemon", "ERROR") as logged:
            response = run_loop(scenario())
        self.assertEqual(response.status, 500)
        self.assertEqual(json.loads(response.body), {"success": False, "error": {
            "code": "INTERNAL_ERROR", "message": "internal server error"}})
        self.assertIn("secret internal detail", "\n".join(logged.output))


# -- the REST API against a live daemon --------------------------------------------------------

SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                    "X-XSS-Protection": "1; mode=block"}


class TestRestApi(DaemonTestCase):
    def assertSecurityHeaders(self, response):
        for name, value in SECURITY_HEADERS.items():
            self.assertEqual(response.getheader(name), value)

    def test_list_start_details_delete(self):
        created = self.daemon.start("api-a", "sleep", ["60"], port="3101", env={"MODE": "x"})
        self.assertEqual(created["message"], "Process 'api-a' started successfully")
        self.assertIs(created["success"], True)
        self.assertEqual(set(created["process"]), {"id", "name", "status", "pid", "port"})
        self.assertEqual(created["process"]["port"], 3101)
        self.assertEqual(created["process"]["status"], "online")
        self.assertTrue(pid_alive(created["process"]["pid"]))

        status, response, listing = self.daemon.get("/api/processes")
        self.assertEqual(status, 200)
        self.assertSecurityHeaders(response)
        self.assertEqual(response.getheader("Content-Type"), "application/json")
        self.assertEqual(listing["total"], len(listing["processes"]))
        entry = [p for p in listing["processes"] if p["name"] == "api-a"][0]
        self.assertEqual(set(entry), {"id", "name", "status", "pid", "port", "cpu", "memory", "uptime",
                                      "restarts", "health"})

        by_name = self.daemon.process("api-a")
        by_id = self.daemon.process(created["process"]["id"])
        self.assertEqual(by_name["id"], by_id["id"])
        self.assertEqual(by_name["config"]["script"], "sleep")
        self.assertEqual(by_name["config"]["args"], ["60"])
        self.assertEqual(by_name["config"]["env"], {"MODE": "x", "PORT": "3101"})
        self.assertEqual(by_name["config"]["cwd"], HERE)
        self.assertGreater(wait_until(lambda: self.daemon.process("api-a")["memory"]), 0)

        status, _, body = self.daemon.request("DELETE", "/api/processes/api-a")
        self.assertEqual((status, body), (200, {"success": True, "message": "Process 'api-a' stopped successfully"}))
        self.assertFalse(pid_alive(created["process"]["pid"]))
        self.assertIsNone(self.daemon.process("api-a"))
        again = self.daemon.start("api-a", "sleep", ["60"])        # the name is free again
        self.assertNotEqual(again["process"]["id"], created["process"]["id"])   # ids are never reused
        self.daemon.request("DELETE", "/api/processes/api-a")

    def test_head_and_options(self):
        status, response, body = self.daemon.request("HEAD", "/api/system")
        self.assertEqual((status, body), (200, b""))
        self.assertGreater(int(response.getheader("Content-Length")), 50)
        own = "http://127.0.0.1:%d" % self.daemon.port          # the dashboard's origin
        status, response, _ = self.daemon.request("OPTIONS", "/api/processes",
                                                  headers={"Origin": own, "Access-Control-Request-Method": "POST"})
        self.assertEqual(status, 204)
        self.assertEqual(response.getheader("Access-Control-Allow-Origin"), own)
        self.assertEqual(response.getheader("Access-Control-Allow-Methods"), "GET, POST, PATCH, DELETE, OPTIONS")
        self.assertIn("Authorization", response.getheader("Access-Control-Allow-Headers"))
        self.assertSecurityHeaders(response)

    def test_stop_start_restart_keep_the_entry(self):
        created = self.daemon.start("api-b", "sleep", ["60"])
        first_pid = created["process"]["pid"]
        status, _, body = self.daemon.post("/api/processes/api-b/stop")
        self.assertEqual(body["message"], "Process 'api-b' stopped successfully")
        stopped = self.daemon.process("api-b")
        self.assertEqual((stopped["status"], stopped["pid"], stopped["uptime"]), ("stopped", None, 0))
        self.assertFalse(pid_alive(first_pid))
        status, _, body = self.daemon.post("/api/processes/api-b/start")
        self.assertEqual((status, body["message"]), (200, "Process 'api-b' started successfully"))
        self.assertError(self.daemon.post("/api/processes/api-b/start"), 409, "PROCESS_ALREADY_RUNNING",
                         "Process 'api-b' is already running")
        second_pid = self.daemon.process("api-b")["pid"]
        status, _, body = self.daemon.post("/api/processes/api-b/restart", {"port": "3205"})
        self.assertEqual((status, body), (200, {"success": True, "message": "Process 'api-b' restarted successfully"}))
        after = self.daemon.process("api-b")
        self.assertFalse(pid_alive(second_pid))
        self.assertEqual((after["port"], after["restarts"], after["status"]), (3205, 1, "online"))
        self.assertEqual(after["config"]["env"]["PORT"], "3205")
        with open("/proc/%d/environ" % after["pid"], "rb") as handle:
            self.assertIn(b"PORT=3205", handle.read().split(b"\0"))
        self.daemon.request("DELETE", "/api/processes/api-b")

    def test_system_metrics(self):
        status, _, body = self.daemon.get("/api/system")
        self.assertEqual(status, 200)
        self.assertEqual(set(body), {"cpu", "memory", "load", "uptime", "timestamp"})
        self.assertEqual(body["cpu"]["cores"], os.cpu_count())
        memory = body["memory"]
        self.assertEqual(memory["used"], memory["total"] - memory["available"])
        self.assertEqual(set(body["load"]), {"one", "five", "fifteen"})
        self.assertRegex(body["timestamp"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        self.assertGreater(body["uptime"], 0)

    def test_logs_last_lines_by_type(self):
        script = "import sys\nfor i in range(30): print('out', i)\nprint('oops', file=sys.stderr)\n" \
                 "sys.stdout.flush(); sys.stderr.flush()\nimport time; time.sleep(60)"
        self.daemon.start("api-logs", PY, ["-c", script])
        wait_until(lambda: self.daemon.get("/api/logs/api-logs?lines=100")[2]["total_lines"] >= 31)
        status, _, body = self.daemon.get("/api/logs/api-logs?lines=5&type=stdout")
        self.assertEqual(status, 200)
        self.assertEqual(body["process"], "api-logs")
        self.assertEqual(body["total_lines"], 5)
        self.assertEqual([e["message"] for e in body["logs"]], ["out %d" % i for i in range(25, 30)])
        self.assertEqual(set(body["logs"][0]), {"timestamp", "type", "message"})
        stderr = self.daemon.get("/api/logs/api-logs?type=stderr")[2]["logs"]
        self.assertEqual([e["message"] for e in stderr], ["oops"])
        self.assertEqual(len(self.daemon.get("/api/logs/api-logs")[2]["logs"]), 20)      # default 20
        self.assertError(self.daemon.get("/api/logs/api-logs?lines=abc"), 400, "VALIDATION_ERROR",
                         "query parameter 'lines' must be an integer from 0 to 10000, got 'abc'")
        self.assertError(self.daemon.get("/api/logs/api-logs?type=both"), 400, "VALIDATION_ERROR",
                         "query parameter 'type' must be all, stdout or stderr, got 'both'")
        self.assertError(self.daemon.get("/api/logs/api-logs?line=5"), 400, "BAD_REQUEST",
                         "unknown query parameter 'line' (allowed: lines, type, follow)")
        self.daemon.request("DELETE", "/api/processes/api-logs")

    def test_follow_streams_new_lines_until_the_process_is_deleted(self):
        go = os.path.join(self.daemon.home, "follow-go")
        script = ("import os, time\nprint('before', flush=True)\n"
                  "while not os.path.exists(%r): time.sleep(0.01)\nprint('after', flush=True)\ntime.sleep(60)" % go)
        self.daemon.start("api-follow", PY, ["-c", script])
        wait_until(lambda: self.daemon.get("/api/logs/api-follow")[2]["logs"], message="first line")
        conn = http.client.HTTPConnection("127.0.0.1", self.daemon.port, timeout=10)
        conn.request("GET", "/api/logs/api-follow?follow=true&lines=1")
        response = conn.getresponse()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.getheader("Transfer-Encoding"), "chunked")
        self.assertEqual(response.getheader("Content-Type"), "application/x-ndjson")
        self.assertEqual(json.loads(response.readline())["message"], "before")
        open(go, "w").close()
        self.assertEqual(json.loads(response.readline())["message"], "after")
        self.daemon.request("DELETE", "/api/processes/api-follow")
        rest = response.read()              # the stream ends cleanly once the process is gone
        self.assertEqual(rest, b"")         # (read() raises IncompleteRead without the final chunk)
        self.assertTrue(response.isclosed())
        conn.close()

    def test_health_shape(self):
        self.daemon.start("api-h", "sleep", ["60"])
        status, _, body = self.daemon.get("/api/processes/api-h/health")
        self.assertEqual(status, 200)
        self.assertEqual(body["process"], "api-h")
        self.assertEqual(body["health"]["status"], "none")
        self.assertLessEqual({"status", "last_check", "check_type", "url", "success_rate", "total_checks",
                              "successful_checks"}, set(body["health"]))
        self.assertEqual((body["health"]["total_checks"], body["health"]["success_rate"]), (0, None))
        self.daemon.request("DELETE", "/api/processes/api-h")

    def test_not_found_everywhere(self):
        for method, path in (("GET", "/api/processes/ghost"), ("DELETE", "/api/processes/ghost"),
                             ("POST", "/api/processes/ghost/restart"), ("POST", "/api/processes/ghost/stop"),
                             ("POST", "/api/processes/ghost/start"), ("GET", "/api/processes/ghost/health"),
                             ("GET", "/api/logs/ghost")):
            with self.subTest(method=method, path=path):
                body = self.assertError(self.daemon.request(method, path), 404, "PROCESS_NOT_FOUND",
                                        "Process 'ghost' not found")
                self.assertEqual(body["error"]["details"]["requested_process"], "ghost")
                self.assertIsInstance(body["error"]["details"]["available_processes"], list)
        self.assertError(self.daemon.get("/api/nothing"), 404, "NOT_FOUND", "no such endpoint: /api/nothing")
        self.assertError(self.daemon.get("/nope"), 404, "NOT_FOUND")
        self.assertError(self.daemon.get("/api/processes%0A"), 404, "NOT_FOUND")

    def test_create_errors(self):
        self.daemon.start("api-dup", "sleep", ["60"])
        body = self.assertError(self.daemon.post("/api/processes", {"name": "api-dup", "script": "sleep"}),
                                409, "PROCESS_ALREADY_EXISTS", "Process 'api-dup' already exists")
        self.assertEqual(body["error"]["details"]["name"], "api-dup")
        self.assertError(self.daemon.post("/api/processes", {"name": "x", "script": "sleep", "bogus": 1}),
                         400, "VALIDATION_ERROR", "unknown field 'bogus'")
        self.assertError(self.daemon.post("/api/processes", {"name": "x", "script": 5}),
                         400, "VALIDATION_ERROR", "field 'script' must be a string, got number 5")
        self.assertError(self.daemon.post("/api/processes", raw_body=b"{nope", headers={"Content-Type": "application/json"}),
                         400, "BAD_REQUEST")
        self.assertError(self.daemon.post("/api/processes", raw_body=b"[]", headers={"Content-Type": "application/json"}),
                         400, "BAD_REQUEST", "request body must be a JSON object, got array")
        self.assertError(self.daemon.post("/api/processes"), 400, "BAD_REQUEST", "request body required: a JSON object")
        self.assertError(self.daemon.post("/api/processes", raw_body=b"name=x", headers={"Content-Type": "text/plain"}),
                         415, "UNSUPPORTED_MEDIA_TYPE")
        self.assertError(self.daemon.post("/api/processes/api-dup/restart", {"colour": 1}), 400,
                         "VALIDATION_ERROR", "unknown field 'colour' (restart accepts 'port' and 'instances')")
        status, response, body = self.daemon.request("PUT", "/api/processes")
        self.assertEqual(status, 405)
        self.assertEqual(response.getheader("Allow"), "GET, POST, HEAD, OPTIONS")
        self.assertEqual(body["error"]["code"], "METHOD_NOT_ALLOWED")
        self.daemon.request("DELETE", "/api/processes/api-dup")

    def test_unexecutable_script_is_errored_with_reason(self):
        status, _, body = self.daemon.post("/api/processes", {"name": "api-bad", "script": "/nonexistent/prog"})
        self.assertEqual(status, 201)
        self.assertEqual(body["process"]["status"], "errored")
        self.assertEqual(body["process"]["error"], "script '/nonexistent/prog' does not exist")
        details = self.daemon.process("api-bad")
        self.assertEqual((details["status"], details["error"]), ("errored", "script '/nonexistent/prog' does not exist"))
        logs = self.daemon.get("/api/logs/api-bad?type=stderr")[2]["logs"]
        self.assertEqual(logs[-1]["message"], "[pmdaemon] failed to start: script '/nonexistent/prog' does not exist")
        status, _, body = self.daemon.post("/api/processes", {"name": "api-noexec", "script": "sh", "cwd": "/",
                                                             "args": []})
        self.assertEqual(body["process"]["status"], "online")
        for name in ("api-bad", "api-noexec"):
            self.daemon.request("DELETE", "/api/processes/" + name)


class TestRestApiChangesAndViews(DaemonTestCase):
    """A process changed in place (PATCH, scale, flush, delete, start that cannot start); the
    dashboard, OpenAPI and PM2 views; hostile input answered with a 4xx and never forged into logs."""

    def test_patch_changes_a_process_in_place(self):
        created = self.daemon.start("up-a", "sh", ["-c", "echo v=$V; exec sleep 60"], env={"V": "1"})["process"]
        wait_until(lambda: self.daemon.last_line("up-a") == "v=1", message="the first run")
        status, _, body = self.daemon.request("PATCH", "/api/processes/up-a", body={"env": {"V": "2"}})
        self.assertEqual((status, body["applied"], body["message"]), (200, "restarted", "Process 'up-a' updated and restarted"))
        wait_until(lambda: self.daemon.last_line("up-a") == "v=2", message="the new setting")
        details = self.daemon.process("up-a")
        self.assertEqual((details["id"], details["restarts"], details["config"]["env"]["V"]), (created["id"], 1, "2"))
        logs = [e["message"] for e in self.daemon.get("/api/logs/up-a?type=stdout")[2]["logs"]]
        self.assertEqual(logs, ["v=1", "v=2"])                      # the same logs
        status, _, body = self.daemon.request("PATCH", "/api/processes/up-a", body={"env": {"V": "2"}})
        self.assertEqual((body["applied"], body["message"]), ("unchanged", "Process 'up-a' is unchanged"))
        self.assertError(self.daemon.request("PATCH", "/api/processes/up-a", body={"kill_timeout": "soon"}),
                         400, "VALIDATION_ERROR")
        self.assertError(self.daemon.request("PATCH", "/api/processes/up-a", body={"name": "other"}),
                         400, "VALIDATION_ERROR", "a process cannot be renamed; delete it and create it anew")
        self.assertError(self.daemon.request("PATCH", "/api/processes/nope", body={}), 404, "PROCESS_NOT_FOUND")
        self.daemon.request("DELETE", "/api/processes/up-a")

    def test_patch_instances_scales_without_restarting_the_others(self):
        self.daemon.post("/api/processes", {"name": "up-g", "script": "sleep", "args": ["60"], "instances": 2})
        before = [p["pid"] for p in self.daemon.get("/api/processes/up-g")[2]["processes"]]
        status, _, body = self.daemon.request("PATCH", "/api/processes/up-g", body={"instances": 3})
        self.assertEqual((status, body["applied"]), (200, "scaled"))
        after = self.daemon.get("/api/processes/up-g")[2]["processes"]
        self.assertEqual([p["pid"] for p in after][:2], before)
        self.assertEqual([(p["name"], p["status"]) for p in after],
                         [("up-g-0", "online"), ("up-g-1", "online"), ("up-g-2", "online")])
        self.daemon.request("DELETE", "/api/processes/up-g")

    def test_autostart_false_and_flush(self):
        status, _, body = self.daemon.post("/api/processes", {"name": "up-idle", "script": "sh", "autostart": False,
                                                              "args": ["-c", "echo started; exec sleep 60"]})
        self.assertEqual((status, body["message"], body["process"]["status"]),
                         (201, "Process 'up-idle' created (not started: autostart is false)", "stopped"))
        self.daemon.post("/api/processes/up-idle/start")
        wait_until(lambda: self.daemon.last_line("up-idle") == "started", message="the line")
        status, _, body = self.daemon.request("DELETE", "/api/logs/up-idle")
        self.assertEqual((status, body["message"]), (200, "Logs of 'up-idle' flushed"))
        self.assertEqual(self.daemon.get("/api/logs/up-idle")[2]["logs"], [])
        self.daemon.request("DELETE", "/api/processes/up-idle")

    def test_the_dashboard_is_served_self_contained_with_its_headers(self):
        status, response, page = self.daemon.get("/")
        self.assertEqual((status, response.getheader("Content-Type")), (200, "text/html; charset=utf-8"))
        csp = response.getheader("Content-Security-Policy")
        self.assertIn("default-src 'self'", csp)
        self.assertIn("frame-ancestors 'none'", csp)
        self.assertNotIn("unsafe-inline", csp)
        self.assertEqual(response.getheader("X-Frame-Options"), "DENY")
        self.assertEqual(response.getheader("Cache-Control"), "no-cache")
        for path, kind in (("/dashboard.js", "text/javascript; charset=utf-8"), ("/dashboard.css", "text/css; charset=utf-8")):
            status, response, body = self.daemon.get(path)
            self.assertEqual((status, response.getheader("Content-Type")), (200, kind))
            page += body
        text = page.decode()
        self.assertNotRegex(text, r"(?i)(https?:)?//[a-z0-9.-]+\.[a-z]{2,}")     # nothing from elsewhere
        self.assertNotRegex(text, r"(?i)<script>|<style>| on[a-z]+=|style=")     # no inline code
        self.assertIn('<script src="/dashboard.js" defer></script>', text)
        etag = self.daemon.get("/")[1].getheader("ETag")
        status, response, body = self.daemon.get("/", headers={"If-None-Match": etag})
        self.assertEqual((status, body, response.getheader("ETag")), (304, b"", etag))
        status, response, body = self.daemon.request("HEAD", "/")
        self.assertEqual((status, body, int(response.getheader("Content-Length"))), (200, b"", len(page) - len(
            self.daemon.get("/dashboard.js")[2]) - len(self.daemon.get("/dashboard.css")[2])))
        self.assertEqual(self.daemon.get("/api/access")[2], {"access": "full", "key": False})

    def test_openapi_describes_every_route(self):
        status, _, document = self.daemon.get("/api/openapi.json")
        self.assertEqual((status, document["openapi"]), (200, "3.1.0"))
        supervisor = pmdaemon.Supervisor(temp_dir(self, "pmd-openapi-"))
        api = pmdaemon.Api(supervisor, pmdaemon.AccessPolicy(None))
        missing = [(route.method, route.template) for route in api.routes
                   if route.method.lower() not in document["paths"].get(route.template, {})]
        self.assertEqual(missing, [])
        documented = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
        self.assertEqual(documented, {(route.method, route.template) for route in api.routes})
        create = document["paths"]["/api/processes"]["post"]
        self.assertEqual(create["requestBody"]["content"]["application/json"]["schema"],
                         {"$ref": "#/components/schemas/ProcessConfig"})
        self.assertEqual(sorted(document["components"]["schemas"]["ProcessConfig"]["properties"]),
                         sorted(pmdaemon.CONFIG_FIELDS))
        self.assertIn("x-websocket", document["paths"]["/ws"]["get"])
        for path, item in document["paths"].items():               # every reference resolves
            for ref in re.findall(r'"\$ref": "#/components/schemas/([A-Za-z0-9]+)"', json.dumps(item)):
                self.assertIn(ref, document["components"]["schemas"], path)

    def test_pm2_views_without_any_env(self):
        self.daemon.start("pm2-a", "sleep", ["60"], env={"SECRET": "hunter2"})
        status, _, jlist = self.daemon.get("/api/pm2/jlist")
        entry = [e for e in jlist if e["name"] == "pm2-a"][0]
        self.assertEqual(status, 200)
        self.assertEqual((entry["pm2_env"]["status"], entry["pm2_env"]["restart_time"], entry["pm2_env"]["exec_mode"]),
                         ("online", 0, "fork_mode"))
        self.assertEqual(set(entry["monit"]), {"memory", "cpu"})
        self.assertEqual(entry["pid"], self.daemon.process("pm2-a")["pid"])
        self.assertGreater(entry["pm2_env"]["pm_uptime"], 1.6e12)            # ms since the epoch, like PM2
        status, _, web = self.daemon.get("/api/pm2")
        self.assertEqual(set(web), {"system_info", "monit", "processes"})
        self.assertEqual(set(web["monit"]), {"loadavg", "total_mem", "free_mem", "cpu", "interfaces"})
        self.assertNotIn("hunter2", json.dumps([jlist, web]))
        self.daemon.request("DELETE", "/api/processes/pm2-a")

    def test_hostile_inputs_get_a_4xx_never_a_500(self):
        self.assertError(self.daemon.get("/api/processes/" + "9" * 5000), 404, "PROCESS_NOT_FOUND")
        deep = b"[" * 100000 + b"]" * 100000
        self.assertError(self.daemon.post("/api/processes", raw_body=deep, headers={"Content-Type": "application/json"}),
                         400, "BAD_REQUEST", "request body is nested deeper than 32 levels")
        nested = '{"name": "x", "script": "sleep", "env": {"A": ' + "[" * 33 + "]" * 33 + "}}"
        self.assertError(self.daemon.post("/api/processes", raw_body=nested.encode(),
                                          headers={"Content-Type": "application/json"}),
                         400, "BAD_REQUEST", "request body is nested deeper than 32 levels")
        self.assertError(self.daemon.get("/api/logs/x?lines=" + "9" * 5000), 400, "VALIDATION_ERROR")
        client = WsClient(self.daemon.port)
        self.addCleanup(client.close)
        client.send(1, deep)
        error = client.recv_message("error")["data"]
        self.assertEqual((error["code"], error["message"]), ("INVALID_JSON", "invalid JSON: nested deeper than 32 levels"))
        client.send_json({"type": "ping"})
        client.recv_message("pong")                         # the connection stays

    def test_client_text_cannot_forge_lines_in_the_daemon_log(self):
        forged = "/nonexistent\n2026-01-01 00:00:00,000 INFO forged-line"
        self.daemon.post("/api/processes", {"name": "fix-forge", "script": forged})
        wait_until(lambda: "fix-forge errored" in read_text(os.path.join(self.daemon.home, "pmdaemon.log")),
                   message="the event in the daemon log")
        text = read_text(os.path.join(self.daemon.home, "pmdaemon.log"))
        self.assertFalse([line for line in text.splitlines() if line.startswith("2026-01-01")], text)
        self.assertIn("fix-forge errored reason=script '/nonexistent\\n2026-01-01", text)
        self.assertEqual(pmdaemon.log_safe("a\nb\x1b[2J\u2028c"), "a\\x0ab\\x1b[2J\\x2028c")
        self.daemon.request("DELETE", "/api/processes/fix-forge")

    def test_start_and_restart_of_a_program_that_cannot_start_answer_422(self):
        script = write_script(os.path.join(self.daemon.home, "app.sh"), "exec sleep 60")
        self.daemon.start("fix-exec", script)
        os.chmod(script, 0o644)                             # no longer executable
        reason = "script %r is not executable (chmod +x, or run it through an interpreter)" % script
        body = self.assertError(self.daemon.post("/api/processes/fix-exec/restart"), 422, "START_FAILED",
                                "Process 'fix-exec' could not start: " + reason)
        self.assertEqual(body["error"]["details"], {"process": "fix-exec", "status": "errored", "reason": reason})
        self.assertEqual(self.daemon.process("fix-exec")["status"], "errored")
        self.assertError(self.daemon.post("/api/processes/fix-exec/start"), 422, "START_FAILED")
        os.chmod(script, 0o755)
        status, _, body = self.daemon.post("/api/processes/fix-exec/start")
        self.assertEqual((status, body["message"]), (200, "Process 'fix-exec' started successfully"))
        self.assertError(self.daemon.post("/api/processes/fix-exec/start"), 409, "PROCESS_ALREADY_RUNNING")
        self.daemon.request("DELETE", "/api/processes/fix-exec")

    def test_a_deleted_process_leaves_no_logs_for_its_successor(self):
        self.daemon.start("fix-logs", "sh", ["-c", "echo old-life; exec sleep 60"])
        wait_until(lambda: self.daemon.last_line("fix-logs") == "old-life", message="the first line")
        files = self.daemon.process("fix-logs")["log_files"]
        self.daemon.request("DELETE", "/api/processes/fix-logs")
        self.assertEqual([os.path.exists(path) for path in files.values()], [False, False])
        self.daemon.start("fix-logs", "sh", ["-c", "echo new-life; exec sleep 60"])
        wait_until(lambda: self.daemon.last_line("fix-logs") == "new-life", message="the new line")
        logs = self.daemon.get("/api/logs/fix-logs?lines=100")[2]["logs"]
        self.assertEqual([entry["message"] for entry in logs], ["new-life"])
        self.daemon.request("DELETE", "/api/processes/fix-logs")

    def test_scaling_after_deleting_a_copy_keeps_names_unique(self):
        self.daemon.post("/api/processes", {"name": "fix-g", "script": "sleep", "args": ["60"], "instances": 2})
        self.daemon.request("DELETE", "/api/processes/fix-g-0")
        status, _, body = self.daemon.post("/api/processes/fix-g/restart", {"instances": 2})
        self.assertEqual(status, 200, body)
        group = self.daemon.get("/api/processes/fix-g")[2]["processes"]
        self.assertEqual([(p["name"], p["instance"], p["status"]) for p in group],
                         [("fix-g-0", 0, "online"), ("fix-g-1", 1, "online")])
        self.assertEqual(len({p["log_files"]["stdout"] for p in group}), 2)
        single = self.daemon.process("fix-g-1")
        self.assertEqual((single["name"], "config" in single), ("fix-g-1", True))   # one process, not a group
        self.daemon.request("DELETE", "/api/processes/fix-g")

    def test_scaling_down_keeps_the_ports_of_the_copies_that_stay(self):
        blocker = socket.socket()
        self.addCleanup(blocker.close)
        for low in range(28000, 29000, 10):             # a free block below the ephemeral range
            try:
                blocker.bind(("127.0.0.1", low))
                break
            except OSError:
                continue
        blocker.close()
        spec = "auto:%d-%d" % (low, low + 9)
        listen = ("import os, socket, time\ns = socket.socket()\ns.bind(('127.0.0.1', int(os.environ['PORT'])))\n"
                  "s.listen()\nprint('listening', flush=True)\ntime.sleep(60)")
        created = self.daemon.post("/api/processes", {"name": "fix-p", "script": PY, "args": ["-c", listen],
                                                      "instances": 3, "port": spec})[2]
        for index in range(3):                           # each copy holds its port
            wait_until(lambda: self.daemon.last_line("fix-p-%d" % index) == "listening", message="copy listening")
        ports = [p["port"] for p in created["processes"]]
        status, _, body = self.daemon.post("/api/processes/fix-p/restart", {"instances": 1})
        self.assertEqual(status, 200, body)
        self.assertEqual(self.daemon.process("fix-p")["port"], ports[0])
        self.daemon.post("/api/processes/fix-p/restart", {"instances": 2})
        self.assertEqual([p["port"] for p in self.daemon.get("/api/processes/fix-p")[2]["processes"]][0], ports[0])
        self.daemon.request("DELETE", "/api/processes/fix-p")


# -- access: peer users, API keys, read keys and tickets, Host and Origin ----------------------

NOBODY = 65534


AS_OTHER_USER = unittest.skipUnless(os.geteuid() == 0, "needs root to run a client as another user")


def run_as(uid, action):
    """What action() returns (bytes), run in a forked child that has become `uid` (needs root);
    an OSError in it comes back as b"ERROR errno"."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # the child: never returns into unittest
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                answer = action()
            except OSError as exc:
                answer = ("ERROR %s" % exc.errno).encode()
            os.write(write_end, answer)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    return answer


def request_as(uid, family, address, extra_header=""):
    """A raw GET /api/processes from a forked child that has become `uid` (needs root): what the
    server answered, or "CONNECT-ERROR errno" when the connection itself was refused."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # the child: never returns into unittest
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                sock = socket.socket(socket.AF_UNIX) if family == "unix" else socket.socket()
                sock.settimeout(10)
                sock.connect(address if family == "unix" else ("127.0.0.1", address))
                sock.sendall(("GET /api/processes HTTP/1.1\r\nHost: localhost\r\n%sConnection: close\r\n\r\n"
                              % extra_header).encode())
                answer = recv_all(sock, 10)
            except OSError as exc:
                answer = ("CONNECT-ERROR %s" % exc.errno).encode()
            os.write(write_end, answer)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    return answer.decode("latin-1")


def readable_copy(test):
    """A copy of pmdaemon.py that any user can read, wherever the checkout lives (a 0700
    directory included), removed after the test."""
    directory = temp_dir(test, "pmd-copy-")
    os.chmod(directory, 0o755)
    copy = os.path.join(directory, "pmdaemon.py")
    shutil.copy(PMDAEMON, copy)
    os.chmod(copy, 0o644)
    return copy


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=10):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class TestPeerUsers(DaemonTestCase):
    """Without a key, only the daemon's own user (and root) may connect, by TCP or Unix socket."""

    @AS_OTHER_USER
    def test_another_user_is_refused_over_loopback_tcp(self):
        raw = request_as(NOBODY, "tcp", self.daemon.port).encode()
        self.assertEqual(status_of(raw), 403, raw)
        self.assertEqual(json_of(raw)["error"], {"code": "FORBIDDEN_USER", "message":
                         "connections from other users (uid 65534) are refused without an API key; "
                         "set one (--api-key-file or $PMDAEMON_API_KEY) to allow them"})
        self.assertEqual(status_of(self.daemon.raw(b"GET /api/system HTTP/1.1\r\nHost: localhost\r\n"
                                                   b"Connection: close\r\n\r\n")), 200)   # our own user

    def test_the_unix_socket_serves_the_same_api_to_its_owner_only(self):
        path = os.path.join(self.daemon.home, "pmdaemon.sock")
        self.assertEqual(oct(os.stat(path).st_mode & 0o777), "0o600")
        conn = UnixHTTPConnection(path)
        conn.request("GET", "/api/processes")
        response = conn.getresponse()
        self.assertEqual((response.status, json.loads(response.read())["total"]), (200, 0))
        conn.close()
        if os.geteuid() != 0:
            return
        self.assertEqual(request_as(NOBODY, "unix", path).split()[0], "CONNECT-ERROR")   # mode 0600
        os.chmod(self.daemon.home, 0o711)
        os.chmod(path, 0o666)                       # even if someone opens it up, SO_PEERCRED decides
        try:
            raw = request_as(NOBODY, "unix", path).encode()
        finally:
            os.chmod(path, 0o600)
            os.chmod(self.daemon.home, 0o700)
        self.assertEqual((status_of(raw), json_of(raw)["error"]["code"]), (403, "FORBIDDEN_USER"))

    def test_the_kernel_names_the_user_of_a_loopback_connection(self):
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen()
        self.addCleanup(server.close)
        client = socket.create_connection(server.getsockname())
        self.addCleanup(client.close)
        accepted, _ = server.accept()
        self.addCleanup(accepted.close)
        users = pmdaemon.PeerUsers()
        self.addCleanup(users.close)
        self.assertEqual(users.uid_of(accepted), os.getuid())               # sock_diag
        with open("/proc/net/tcp") as handle:                                # the fallback, same answer
            table = handle.read()
        entry = pmdaemon.proc_net_tcp_entry(table, socket.AF_INET, accepted.getpeername(), accepted.getsockname())
        self.assertEqual((entry.state, entry.uid), (pmdaemon.TCP_ESTABLISHED, os.getuid()))
        self.assertNotEqual(entry.inode, 0)
        users._netlink_broken = True
        self.assertEqual(users.uid_of(accepted), os.getuid())
        self.assertIsNone(pmdaemon.proc_net_tcp_entry(table, socket.AF_INET, ("127.0.0.1", 1), ("127.0.0.1", 2)))

    def test_only_a_live_connected_socket_names_its_user(self):
        entry = pmdaemon.SocketEntry
        self.assertEqual(pmdaemon.trusted_owner(entry(pmdaemon.TCP_ESTABLISHED, 1000, 4242)), 1000)
        self.assertIsNone(pmdaemon.trusted_owner(entry(5, 0, 0)))          # FIN_WAIT2 remnant: "uid 0"
        self.assertIsNone(pmdaemon.trusted_owner(entry(6, 0, 0)))          # TIME_WAIT
        self.assertIsNone(pmdaemon.trusted_owner(entry(pmdaemon.TCP_ESTABLISHED, 0, 0)))   # no inode
        self.assertIsNone(pmdaemon.trusted_owner(entry(4, 1000, 4242)))    # FIN_WAIT1: closing
        self.assertIsNone(pmdaemon.trusted_owner(None))

    @AS_OTHER_USER
    def test_a_connection_closed_before_it_is_looked_at_is_refused(self):
        # The attack: connect, send, close while the daemon is busy; by the time the daemon looks,
        # the client's socket is a TIME_WAIT/FIN_WAIT2 remnant that the kernel reports as uid 0.
        # A stopped daemon makes "busy" certain: the kernel completes the handshake meanwhile.
        daemon = Daemon()
        self.addCleanup(daemon.cleanup)
        body = json.dumps({"name": "rootshell", "script": "sleep", "args": ["60"]}).encode()
        request = (b"POST /api/processes HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

        def connect_send_close():
            ports = []
            for _ in range(5):
                with socket.socket() as sock:
                    sock.connect(("127.0.0.1", daemon.port))
                    sock.sendall(request)
                    ports.append(sock.getsockname()[1])
            return json.dumps(ports).encode()

        def client_states(ports):
            with open("/proc/net/tcp") as handle:
                rows = [line.split() for line in handle.read().splitlines()[1:]]
            return {(row[3], row[7]) for row in rows if int(row[1].split(":")[1], 16) in ports}
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        try:
            ports = json.loads(run_as(NOBODY, connect_send_close).decode())
            # Until the kernel has made each of them a remnant (FIN_WAIT2 or TIME_WAIT, uid 0, inode 0).
            wait_until(lambda: client_states(ports) <= {("05", "0"), ("06", "0")},
                       message="the clients' sockets to be remnants that say uid 0")
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)

        def refusals():
            metrics = daemon.get("/metrics")[2].decode()
            found = re.search(r'pmdaemon_http_requests_total\{code="403"\} (\d+)', metrics)
            return int(found.group(1)) if found else 0
        wait_until(lambda: refusals() >= 5 or daemon.process("rootshell"), message="the five connections judged")
        self.assertIsNone(daemon.process("rootshell"))
        self.assertEqual(refusals(), 5)

    def test_an_unknown_user_is_refused(self):
        policy = pmdaemon.AccessPolicy(None)
        with self.assertRaises(pmdaemon.HttpError) as caught:
            policy.check_peer(None)
        self.assertEqual((caught.exception.status, caught.exception.code), (403, "FORBIDDEN_USER"))
        self.assertIn("set an API key", caught.exception.message)
        self.assertFalse(pmdaemon.AccessPolicy("key").checks_peers)


class TestApiKey(DaemonTestCase):
    daemon_env = {"PMDAEMON_API_KEY": "s3cret-key"}

    def test_no_key_no_body_read_and_no_100_continue(self):
        for framing in (b"Content-Length: 1000000\r\nExpect: 100-continue\r\n", b"Transfer-Encoding: chunked\r\n"):
            with socket.create_connection(("127.0.0.1", self.daemon.port), timeout=5) as sock:
                sock.sendall(b"POST /api/processes HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                             + framing + b"\r\n" + b"1\r\nx\r\n" * 200)
                raw = recv_all(sock, 5)
            self.assertEqual(status_of(raw), 401, raw[:100])
            self.assertNotIn(b"100 Continue", raw)

    @AS_OTHER_USER
    def test_with_a_key_other_users_are_judged_by_the_key(self):
        self.assertEqual(status_of(request_as(NOBODY, "tcp", self.daemon.port).encode()), 401)
        raw = request_as(NOBODY, "tcp", self.daemon.port, "Authorization: Bearer s3cret-key\r\n").encode()
        self.assertEqual(status_of(raw), 200)

    def test_the_unix_socket_is_the_owners_door_and_needs_no_key(self):
        path = os.path.join(self.daemon.home, "pmdaemon.sock")
        head = b"GET /api/processes HTTP/1.1\r\nHost: localhost\r\n\r\n"
        for _ in range(2):                          # twice: the second is a head answered before
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                sock.connect(path)
                sock.sendall(head * 2)
                raw = sock.recv(65536)
            self.assertEqual(status_of(raw), 200, raw[:200])
        # The same bytes over TCP are still judged by the key: nothing learned on the socket leaks.
        with socket.create_connection(("127.0.0.1", self.daemon.port), timeout=5) as sock:
            sock.sendall(head * 2)
            raw = sock.recv(65536)
        self.assertEqual(status_of(raw), 401, raw[:200])
        environ = dict(os.environ, PMDAEMON_HOME=self.daemon.home)
        for name in ("PMDAEMON_API_KEY", "PMDAEMON_URL"):
            environ.pop(name, None)
        listed = subprocess.run([PY, PMDAEMON, "ls"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=environ, timeout=30)
        self.assertEqual(listed.returncode, 0, listed.stderr)

    @AS_OTHER_USER
    def test_another_user_on_the_unix_socket_is_refused_even_with_the_key(self):
        path = os.path.join(self.daemon.home, "pmdaemon.sock")
        os.chmod(self.daemon.home, 0o711)
        os.chmod(path, 0o666)                       # opened up by mistake: SO_PEERCRED still decides
        try:
            raw = request_as(NOBODY, "unix", path, "Authorization: Bearer s3cret-key\r\n").encode()
        finally:
            os.chmod(path, 0o600)
            os.chmod(self.daemon.home, 0o700)
        self.assertEqual((status_of(raw), json_of(raw)["error"]["code"]), (403, "FORBIDDEN_USER"))

    def test_key_required_and_accepted_both_ways(self):
        body = self.assertError(self.daemon.get("/api/processes"), 401, "UNAUTHORIZED")
        self.assertNotIn("s3cret", json.dumps(body))
        self.assertError(self.daemon.get("/api/system", headers={"Authorization": "Bearer wrong"}), 401, "UNAUTHORIZED")
        self.assertEqual(self.daemon.get("/api/system", headers={"Authorization": "Bearer s3cret-key"})[0], 200)
        self.assertEqual(self.daemon.get("/api/system", headers={"X-API-Key": "s3cret-key"})[0], 200)
        status, response, _ = self.daemon.get("/api/system", headers={"X-API-Key": "s3cret-key",
                                                                      "Origin": "https://dash.example"})
        self.assertEqual(response.getheader("Access-Control-Allow-Origin"), "*")

    def test_preflight_needs_no_key_and_does_nothing(self):
        status, response, _ = self.daemon.request("OPTIONS", "/api/processes/x",
                                                  headers={"Origin": "https://dash.example"})
        self.assertEqual(status, 204)
        self.assertEqual(response.getheader("Access-Control-Allow-Headers"), "Content-Type, Authorization, X-API-Key")

    def test_websocket_needs_the_key_or_a_single_use_ticket(self):
        denied = self.ws()
        self.assertEqual((denied.status, denied.body["error"]["code"]), (401, "UNAUTHORIZED"))
        self.assertEqual(self.ws(headers={"X-API-Key": "s3cret-key"}).status, 101)
        self.assertEqual(self.ws(headers={"Authorization": "Bearer s3cret-key"}).status, 101)
        self.assertError(self.daemon.post("/api/ws-ticket"), 401, "UNAUTHORIZED")
        status, _, body = self.daemon.post("/api/ws-ticket", headers={"X-API-Key": "s3cret-key"})
        self.assertEqual((status, body["expires_in"]), (201, 30))
        ticket = body["ticket"]
        self.assertEqual(self.ws(path="/ws?ticket=" + ticket).status, 101)
        self.assertEqual(self.ws(path="/ws?ticket=" + ticket).status, 401)   # single use

    @unittest.skipUnless(os.geteuid() == 0 and os.access("/usr/bin/python3", os.X_OK),
                         "needs root and a system python3 to run a daemon as another user")
    def test_a_child_cannot_read_the_key_from_its_parent(self):
        home = temp_dir(self, "pmd-nobody-")
        os.chown(home, NOBODY, NOBODY)
        readable = readable_copy(self)          # the checkout may be in a directory nobody cannot enter
        environ = dict(os.environ, PMDAEMON_API_KEY="s3cret-key", PMDAEMON_HOME=home)
        daemon = subprocess.Popen(["/usr/bin/python3", readable, "web", "--port", "0"], cwd=home, env=environ,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  preexec_fn=lambda: (os.setgroups([]), os.setgid(NOBODY), os.setuid(NOBODY)))
        try:
            line = daemon.stdout.readline().decode()
            port = int(line.split("http://127.0.0.1:")[1].split()[0])
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            self.addCleanup(conn.close)
            headers = {"Authorization": "Bearer s3cret-key", "Content-Type": "application/json"}
            spy = ("import os\ntry:\n    data = open('/proc/%d/environ' % os.getppid(), 'rb').read()\n"
                   "    print('LEAKED' if b's3cret' in data else 'READ')\nexcept OSError as exc:\n"
                   "    print('DENIED', exc.errno)\nimport time; time.sleep(30)")
            conn.request("POST", "/api/processes", json.dumps({"name": "spy", "script": "/usr/bin/python3",
                                                                "args": ["-c", spy], "cwd": home}), headers)
            created = conn.getresponse()
            self.assertEqual((created.status, json.loads(created.read())["process"]["status"]), (201, "online"))

            def spy_said():
                conn.request("GET", "/api/logs/spy?type=stdout", headers=headers)
                logs = json.loads(conn.getresponse().read())["logs"]
                return logs[0]["message"] if logs else None
            self.assertEqual(wait_until(spy_said, message="the spy's answer"), "DENIED 13")
        finally:
            daemon.terminate()
            daemon.communicate(timeout=15)

    def test_the_key_is_wiped_from_the_daemons_environment(self):
        with open("/proc/%d/environ" % self.daemon.proc.pid, "rb") as handle:
            environ = handle.read()
        self.assertNotIn(b"s3cret-key", environ)
        self.assertIn(b"PMDAEMON_HOME=", environ)               # the rest is as it was

    def test_key_never_reaches_children(self):
        headers = {"X-API-Key": "s3cret-key"}
        self.daemon.headers = headers
        try:
            created = self.daemon.start("key-env", "sleep", ["60"])
            with open("/proc/%d/environ" % created["process"]["pid"], "rb") as handle:
                self.assertNotIn(b"s3cret-key", handle.read())
            self.daemon.request("DELETE", "/api/processes/key-env")
        finally:
            self.daemon.headers = {}


METRIC_SAMPLE_RE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
                              r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*")*)?\})? (\S+)\Z')


def parse_exposition(text):
    """Samples of a Prometheus 0.0.4 text, checked against the grammar: name -> [(labels, value)]."""
    families, samples = {}, {}
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            _, keyword, name, rest = line.split(" ", 3)
            families.setdefault(name, {})[keyword] = rest
            continue
        match = METRIC_SAMPLE_RE.match(line)
        assert match, "not an exposition line: %r" % line
        name, labels, value = match.group(1), match.group(2) or "", match.group(3)
        assert set(families.get(name, {})) == {"HELP", "TYPE"}, "no HELP and TYPE before %s" % name
        assert families[name]["TYPE"] in ("counter", "gauge"), name
        assert name.endswith("_total") == (families[name]["TYPE"] == "counter"), name
        float(value)
        samples.setdefault(name, []).append((labels, float(value)))
    return samples


class ReadKeyDaemonCase(DaemonTestCase):
    """A class's daemon with the full key "full-key" and a read-only key "look-only"."""
    daemon_env = {"PMDAEMON_API_KEY": "full-key"}

    @classmethod
    def setUpClass(cls):
        cls.key_dir = tempfile.mkdtemp(prefix="pmd-keys-")
        with open(os.path.join(cls.key_dir, "read"), "w") as handle:
            handle.write("look-only\n")
        cls.daemon_args = ("--read-key-file", os.path.join(cls.key_dir, "read"))
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        shutil.rmtree(cls.key_dir, ignore_errors=True)


class TestMetricsAndReadKeys(ReadKeyDaemonCase):

    def test_metrics_in_the_prometheus_text_format(self):
        full = {"Authorization": "Bearer full-key"}
        status, _, _ = self.daemon.post("/api/processes", {"name": "met-a", "script": "sh",
                                                           "args": ["-c", "echo hi; exec sleep 60"]}, headers=full)
        self.assertEqual(status, 201)
        self.assertEqual(self.daemon.get("/metrics")[0], 401)             # the same access rules
        status, response, body = self.daemon.get("/metrics", headers=full)
        self.assertEqual((status, response.getheader("Content-Type")), (200, "text/plain; version=0.0.4; charset=utf-8"))
        samples = parse_exposition(body.decode())
        labels = '{name="met-a",id="0",instance="0"'
        self.assertIn((labels + ',status="online"}', 1.0), samples["pmdaemon_process_status"])
        self.assertIn((labels + ',status="stopped"}', 0.0), samples["pmdaemon_process_status"])
        self.assertIn((labels + "}", 0.0), samples["pmdaemon_process_restarts_total"])
        for family in ("pmdaemon_process_cpu_percent", "pmdaemon_process_memory_bytes", "pmdaemon_system_load",
                       "pmdaemon_daemon_resident_memory_bytes", "pmdaemon_daemon_open_fds",
                       "pmdaemon_http_requests_total", "pmdaemon_websocket_clients",
                       "pmdaemon_websocket_dropped_messages_total", "pmdaemon_process_log_write_errors_total",
                       "pmdaemon_process_health_status", "pmdaemon_system_memory_total_bytes"):
            self.assertIn(family, samples)
        self.assertGreater(dict(samples["pmdaemon_http_requests_total"])['{code="401"}'], 0)
        self.assertGreater(dict(samples["pmdaemon_daemon_resident_memory_bytes"])[""], 1 << 20)
        self.assertEqual(pmdaemon.metric_labels({"a": 'x"y\\z\nw'}), '{a="x\\"y\\\\z\\nw"}')
        self.daemon.request("DELETE", "/api/processes/met-a", headers=full)

    def test_a_read_key_reads_and_never_acts(self):
        read = {"Authorization": "Bearer look-only"}
        for path in ("/api/processes", "/api/system", "/metrics"):
            self.assertEqual(self.daemon.get(path, headers=read)[0], 200, path)
        body = self.assertError(self.daemon.post("/api/processes", {"name": "ro", "script": "sleep"}, headers=read),
                                403, "FORBIDDEN_READ_ONLY")
        self.assertEqual(body["error"]["message"], "this key can only read: POST /api/processes needs the API key")
        self.assertError(self.daemon.request("DELETE", "/api/processes/x", headers=read), 403, "FORBIDDEN_READ_ONLY")
        self.assertError(self.daemon.request("PATCH", "/api/processes/x", body={}, headers=read),
                         403, "FORBIDDEN_READ_ONLY")
        self.assertError(self.daemon.get("/api/system", headers={"Authorization": "Bearer nope"}), 401, "UNAUTHORIZED")
        client = self.ws(headers={"Authorization": "Bearer look-only"})    # state and logs over /ws too
        self.assertEqual(client.status, 101)
        client.recv_message("system_update")


class TestReadKeyViews(ReadKeyDaemonCase):
    full = {"Authorization": "Bearer full-key"}
    read = {"Authorization": "Bearer look-only"}

    def test_a_read_key_sees_env_names_and_urls_without_credentials(self):
        watcher = self.ws(headers=self.read)
        self.assertEqual(watcher.status, 101)
        status, _, _ = self.daemon.post("/api/processes", {
            "name": "secretive", "script": "sleep", "args": ["60"], "env": {"DB_PASSWORD": "hunter2-secret"},
            "health_check": {"type": "http", "url": "http://admin:pa55word@127.0.0.1:9/health",
                             "interval": 100, "retries": 1}, "restart_on_unhealthy": False}, headers=self.full)
        self.assertEqual(status, 201)
        self.addCleanup(self.daemon.request, "DELETE", "/api/processes/secretive", headers=self.full)
        wait_until(lambda: self.daemon.get("/api/processes/secretive/health", headers=self.full)[2]
                   ["health"]["total_checks"] >= 2, message="two health checks")
        seen = []
        for path in ("/api/processes", "/api/processes?name=secret*", "/api/processes/secretive",
                     "/api/processes/secretive/health", "/metrics", "/api/pm2/jlist", "/api/pm2", "/api/system"):
            status, _, body = self.daemon.get(path, headers=self.read)
            self.assertEqual(status, 200, path)
            seen.append(body if isinstance(body, bytes) else json.dumps(body).encode())
        deadline = time.monotonic() + 2          # what a read-key WebSocket session was sent meanwhile
        while time.monotonic() < deadline:
            watcher.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                event = watcher.recv()
                seen.append(event.data if isinstance(event.data, bytes) else str(event.data).encode())
            except socket.timeout:
                break
        self.assertTrue(any(b'"secretive"' in frame for frame in seen[8:]), "the WebSocket session saw the process")
        for body in seen:
            self.assertNotIn(b"hunter2", body)
            self.assertNotIn(b"pa55word", body)
        details = self.daemon.get("/api/processes/secretive", headers=self.read)[2]
        self.assertEqual(details["config"]["env"], {"DB_PASSWORD": "***"})
        self.assertEqual(details["config"]["health_check"]["url"], "http://***@127.0.0.1:9/health")
        health = self.daemon.get("/api/processes/secretive/health", headers=self.read)[2]["health"]
        self.assertEqual(health["url"], "http://***@127.0.0.1:9/health")
        details = self.daemon.get("/api/processes/secretive", headers=self.full)[2]       # the full key sees all
        self.assertEqual(details["config"]["env"], {"DB_PASSWORD": "hunter2-secret"})
        self.assertEqual(details["config"]["health_check"]["url"], "http://admin:pa55word@127.0.0.1:9/health")
        self.assertEqual(pmdaemon.without_credentials("https://u@h:1/p?q=1"), "https://***@h:1/p?q=1")
        self.assertEqual(pmdaemon.without_credentials("http://h/p@x"), "http://h/p@x")


class TestWsTickets(ReadKeyDaemonCase):
    def test_a_read_key_cannot_take_the_full_keys_tickets(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.daemon.port, timeout=15)
        self.addCleanup(conn.close)
        statuses = []
        for _ in range(pmdaemon.MAX_WS_TICKETS_PER_KEY + 1):
            conn.request("POST", "/api/ws-ticket", headers={"Authorization": "Bearer look-only"})
            response = conn.getresponse()
            statuses.append((response.status, json.loads(response.read())))
        self.assertEqual([status for status, _ in statuses[:-1]], [201] * pmdaemon.MAX_WS_TICKETS_PER_KEY)
        self.assertEqual(statuses[-1], (503, {"success": False, "error": {
            "code": "TOO_MANY_TICKETS", "message": "too many unused WebSocket tickets for this key; retry later"}}))
        status, _, body = self.daemon.post("/api/ws-ticket", headers={"Authorization": "Bearer full-key"})
        self.assertEqual(status, 201)
        self.assertEqual(self.ws(path="/ws?ticket=" + body["ticket"]).status, 101)
        self.assertEqual(self.ws(path="/ws?ticket=" + statuses[0][1]["ticket"]).status, 101)

    def test_tickets_carry_their_keys_access_and_read_keys_share_a_bound(self):
        book = pmdaemon.TicketBook(clock=lambda: 0.0)
        for index in range(pmdaemon.MAX_WS_TICKETS // pmdaemon.MAX_WS_TICKETS_PER_KEY):
            for _ in range(pmdaemon.MAX_WS_TICKETS_PER_KEY):
                book.issue("read-%d" % index, "read")
        with self.assertRaises(pmdaemon.HttpError) as caught:
            book.issue("read-99", "read")
        self.assertEqual((caught.exception.status, caught.exception.code), (503, "TOO_MANY_TICKETS"))
        ticket = book.issue("full", "full")
        self.assertEqual(book.redeem(ticket), "full")
        self.assertIsNone(book.redeem(ticket))
        self.assertEqual(book.redeem(next(iter(book._tickets))), "read")


class TestHostAndOrigin(DaemonTestCase):
    def test_non_loopback_host_is_refused_without_key(self):
        self.assertError(self.daemon.get("/api/processes", headers={"Host": "evil.example:9615"}), 403,
                         "FORBIDDEN_HOST")
        for host in ("localhost:9615", "127.0.0.1", "[::1]:9615", "app.localhost"):
            self.assertEqual(self.daemon.get("/api/system", headers={"Host": host})[0], 200, host)

    def test_framing_errors_carry_cors_headers_too(self):
        origin = b"http://127.0.0.1:%d" % self.daemon.port
        raw = self.daemon.raw(b"POST /api/processes HTTP/1.1\r\nHost: localhost\r\nOrigin: %s\r\n"
                              b"Content-Type: application/json\r\nContent-Length: 5000000\r\n\r\n" % origin)
        self.assertEqual(status_of(raw), 413)
        self.assertIn(b"\r\nAccess-Control-Allow-Origin: %s\r\n" % origin, raw)
        self.assertEqual(json_of(raw)["error"]["code"], "PAYLOAD_TOO_LARGE")

    def test_without_a_key_only_the_daemons_own_origin_is_served(self):
        own = "http://127.0.0.1:%d" % self.daemon.port
        status, response, _ = self.daemon.get("/api/system", headers={"Origin": own})
        self.assertEqual((status, response.getheader("Access-Control-Allow-Origin")), (200, own))
        # Another user's page on loopback, opened in the operator's browser, is not the dashboard:
        # another port, or the same port on an address the daemon does not hold (someone else
        # may listen there; a browser may try ::1 first for "localhost").
        port = self.daemon.port
        for other in ("http://127.0.0.1:22500", "http://localhost", "https://127.0.0.1:%d" % port,
                      "http://127.0.0.2:%d" % port, "http://localhost:%d" % port, "http://[::1]:%d" % port,
                      "http://app.localhost:%d" % port, "https://evil.example", "http://127.0.0.1:99999", "null"):
            self.assertError(self.daemon.post("/api/processes", {"name": "x", "script": "sleep"},
                                              headers={"Origin": other}), 403, "FORBIDDEN_ORIGIN")
            self.assertError(self.daemon.request("OPTIONS", "/api/processes", headers={
                "Origin": other, "Access-Control-Request-Method": "POST"}), 403, "FORBIDDEN_ORIGIN")
        self.assertIsNone(self.daemon.process("x"))

    def test_cors_origin_names_other_pages(self):
        daemon = Daemon(args=["--cors-origin", "http://127.0.0.1:22500"])
        self.addCleanup(daemon.cleanup)
        status, response, _ = daemon.get("/api/system", headers={"Origin": "http://127.0.0.1:22500"})
        self.assertEqual((status, response.getheader("Access-Control-Allow-Origin")), (200, "http://127.0.0.1:22500"))

    def test_refuses_public_bind_without_key(self):
        environ = dict(os.environ, PMDAEMON_HOME=temp_dir(self))
        environ.pop("PMDAEMON_API_KEY", None)
        for host in ("0.0.0.0", "no-such-host.invalid"):       # judged by what the name resolves to
            result = subprocess.run([PY, PMDAEMON, "web", "--host", host, "--port", "0"], env=environ,
                                    **CAPTURE, timeout=10)
            self.assertEqual(result.returncode, 2)
            self.assertIn(b"refusing to listen on %s without an API key" % host.encode(), result.stderr)
        self.assertTrue(pmdaemon.is_loopback_bind("localhost"))
        self.assertTrue(pmdaemon.is_loopback_bind("[::1]"))
        self.assertFalse(pmdaemon.is_loopback_bind("0.0.0.0"))

    def test_the_authority_of_an_absolute_target_is_the_host(self):
        raw = self.daemon.raw(b"GET http://evil.example/api/system HTTP/1.1\r\nHost: localhost\r\n"
                              b"Connection: close\r\n\r\n")
        self.assertEqual((status_of(raw), json_of(raw)["error"]["code"]), (403, "FORBIDDEN_HOST"))
        raw = self.daemon.raw(b"GET http://localhost:9615/api/system HTTP/1.1\r\nHost: evil.example\r\n"
                              b"Connection: close\r\n\r\n")
        self.assertEqual(status_of(raw), 200)

    def test_a_request_without_host_or_with_two_origins_is_refused(self):
        raw = self.daemon.raw(b"GET /api/system HTTP/1.0\r\n\r\n")
        self.assertEqual((status_of(raw), json_of(raw)["error"]["message"]), (403, "a request without Host is "
                         "refused without an API key (HTTP/1.0 clients: send a Host header)"))
        raw = self.daemon.raw(b"GET /api/system HTTP/1.1\r\nHost: localhost\r\nOrigin: http://localhost\r\n"
                              b"Origin: https://evil.example\r\nConnection: close\r\n\r\n")
        self.assertEqual((status_of(raw), json_of(raw)["error"]["message"]), (400, "more than one Origin header"))


# ----------------------------------------------------------------------------------------------
# 10. Server glue
# ----------------------------------------------------------------------------------------------

# -- HTTP serving against a live daemon: keep-alive, pipelining, bodies, deadlines -------------

class TestHttpServerBehaviour(DaemonTestCase):
    def test_pipelined_requests_are_answered_in_order(self):
        requests = b"".join(b"GET /api/processes/%s HTTP/1.1\r\nHost: localhost\r\n\r\n" % name
                            for name in (b"p1", b"p2", b"p3"))
        requests += b"GET /api/system HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        raw = self.daemon.raw(requests)
        responses = raw.split(b"HTTP/1.1 ")[1:]
        self.assertEqual(len(responses), 4)
        self.assertEqual([r.split(b"\r\n\r\n", 1)[1].count(b"'p%d'" % (i + 1)) for i, r in enumerate(responses[:3])],
                         [1, 1, 1])
        self.assertTrue(responses[3].startswith(b"200 OK"))

    def test_a_repeated_head_sees_every_change(self):
        """The fast path answers from the live snapshot: a process created meanwhile (on another
        connection) is in the very next answer on a connection that keeps asking the same."""
        head = b"GET /api/processes HTTP/1.1\r\nHost: localhost\r\nX-Probe: change\r\n\r\n"
        with socket.create_connection(("127.0.0.1", self.daemon.port), timeout=5) as sock:
            answers = []
            for _ in range(3):
                sock.sendall(head)
                answers.append(json_of(read_one_response(sock)))
            self.daemon.start("fast-path-new", "sleep", ["60"])
            sock.sendall(head)
            names = [entry["name"] for entry in json_of(read_one_response(sock))["processes"]]
        self.assertNotIn("fast-path-new", [entry["name"] for entry in answers[-1]["processes"]])
        self.assertIn("fast-path-new", names)
        self.daemon.request("DELETE", "/api/processes/fast-path-new")

    def test_a_method_nobody_knows_is_not_allowed_rather_than_a_server_error(self):
        raw = self.daemon.raw(b"QUERY /api/processes HTTP/1.1\r\nHost: localhost\r\n\r\n"
                              b"BREW /nope HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        self.assertEqual(re.findall(rb"HTTP/1\.1 (\d{3}) ", raw), [b"405", b"404"])
        self.assertIn(b"Allow: GET, POST, HEAD, OPTIONS\r\n", raw)

    def test_framing_errors_are_answered_in_the_error_format_and_closed(self):
        for data, status in ((b"GET / HTTP/1.1\r\n\r\n", 400), (b"GET / HTTP/3.0\r\nHost: a\r\n\r\n", 505),
                             (b"POST /api/processes HTTP/1.1\r\nHost: localhost\r\nContent-Length: 9999999\r\n\r\n", 413),
                             (b"GET /" + b"x" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
                             (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-A: b\r\n" * 200 + b"\r\n", 431),
                             (b"POST /api/processes HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
                              b"Content-Length: 3\r\n\r\nabc", 400)):
            with self.subTest(data=data[:50]):
                raw = self.daemon.raw(data)
                self.assertEqual(status_of(raw), status)
                self.assertIn(b"Connection: close\r\n", raw)
                self.assertIn(b"X-Frame-Options: DENY\r\n", raw)
                self.assertIs(json_of(raw)["success"], False)

    def test_chunked_post_and_http10(self):
        body = json.dumps({"name": "chunky", "script": "sleep", "args": ["60"]}).encode()
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        raw = self.daemon.raw(b"POST /api/processes HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                              b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked)
        self.assertEqual(status_of(raw), 201, raw)
        raw = self.daemon.raw(b"GET /api/processes/chunky HTTP/1.0\r\nHost: localhost\r\n\r\n")
        self.assertEqual(status_of(raw), 200)
        self.assertIn(b"Connection: close", raw)
        self.assertEqual(json_of(raw)["name"], "chunky")
        self.daemon.request("DELETE", "/api/processes/chunky")

    def test_expect_100_continue(self):
        body = json.dumps({"name": "", "script": "sleep"}).encode()
        with socket.create_connection(("127.0.0.1", self.daemon.port), timeout=5) as sock:
            sock.sendall(b"POST /api/processes HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                         b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
            self.assertEqual(sock.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(body + b"GET /api/system HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            raw = recv_all(sock)
        self.assertEqual(status_of(raw), 400)
        self.assertEqual(raw.count(b"HTTP/1.1 "), 2)

    def test_a_refusal_is_decided_from_the_head(self):
        # A body for a route that does not exist, with the wrong media type or too large: answered
        # at once, no 100 Continue, and the body is never waited for.
        for head, status in ((b"POST /api/nope HTTP/1.1\r\nContent-Type: application/json\r\n", 404),
                             (b"POST /api/processes HTTP/1.1\r\nContent-Type: text/plain\r\n", 415),
                             (b"DELETE /api/system HTTP/1.1\r\nContent-Type: application/json\r\n", 405)):
            with socket.create_connection(("127.0.0.1", self.daemon.port), timeout=5) as sock:
                sock.sendall(head + b"Host: localhost\r\nExpect: 100-continue\r\nContent-Length: 900000\r\n\r\n")
                raw = recv_all(sock, 5)
            self.assertEqual(status_of(raw), status, raw[:200])
            self.assertNotIn(b"100 Continue", raw)
            self.assertIn(b"Connection: close\r\n", raw)
        # Without a body, a refusal leaves the connection open for the next request.
        raw = self.daemon.raw(b"GET /api/nope HTTP/1.1\r\nHost: localhost\r\n\r\n"
                              b"GET /api/processes/nope HTTP/1.1\r\nHost: localhost\r\n\r\n"
                              b"GET /api/system HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        self.assertEqual(re.findall(rb"HTTP/1\.1 (\d{3}) ", raw), [b"404", b"404", b"200"])

    def test_slow_client_does_not_block_others(self):
        with socket.create_connection(("127.0.0.1", self.daemon.port)) as slow:
            slow.sendall(b"GET /api/system HTTP/1.1\r\nHo")          # and then nothing
            status, _, _ = self.daemon.get("/api/system")
            self.assertEqual(status, 200)
            # Had the server waited for the slow client, the other request would only have been
            # served after the slow one timed out; the slow one is still unanswered.
            slow.setblocking(False)
            with self.assertRaises(BlockingIOError):
                slow.recv(1)
            slow.setblocking(True)
            slow.sendall(b"st: localhost\r\nConnection: close\r\n\r\n")
            self.assertEqual(status_of(recv_all(slow, 2)), 200)

    def test_keep_alive_connection_serves_many_requests(self):
        # One socket, twenty requests in turn: a server that closed after each would fail here
        # (http.client would reconnect silently, which is why this uses a raw socket).
        with socket.create_connection(("127.0.0.1", self.daemon.port), timeout=10) as sock:
            reader = sock.makefile("rb")
            for _ in range(20):
                sock.sendall(b"GET /api/processes HTTP/1.1\r\nHost: localhost\r\n\r\n")
                status_line = reader.readline()
                headers = {}
                for line in iter(reader.readline, b"\r\n"):
                    name, _, value = line.decode().partition(":")
                    headers[name.lower()] = value.strip()
                body = reader.read(int(headers["content-length"]))
                self.assertEqual(status_line, b"HTTP/1.1 200 OK\r\n")
                self.assertNotIn("connection", headers)
                self.assertIn("processes", json.loads(body))


class TestBodyMemory(DaemonTestCase):
    daemon_args = ("--max-body-memory", "2500000")

    def test_bodies_in_flight_share_one_budget(self):
        head = (b"POST /api/processes HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b"Expect: 100-continue\r\nContent-Length: 1000000\r\n\r\n")
        holders = []
        for _ in range(2):                              # 2 x 1 MB of the 2.5 MB budget
            sock = socket.create_connection(("127.0.0.1", self.daemon.port), timeout=5)
            self.addCleanup(sock.close)
            sock.sendall(head)
            self.assertEqual(sock.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(b"{" * 1000)
            holders.append(sock)
        raw = self.daemon.raw(head)
        self.assertEqual(status_of(raw), 503)
        self.assertEqual(json_of(raw)["error"]["message"], "too many request bodies in flight; retry shortly")
        self.assertIn(b"Retry-After: 1\r\n", raw)
        self.assertEqual(self.daemon.get("/api/system")[0], 200)           # bodiless requests still served
        holders[0].close()                              # its reservation is returned
        whole = head.replace(b"Expect: 100-continue\r\n", b"Connection: close\r\n") + b"x" * 1000000
        wait_until(lambda: status_of(self.daemon.raw(whole)) == 400, message="the budget to be returned")


class TestTimeouts(DaemonTestCase):
    daemon_args = ("--header-timeout", "0.5", "--body-timeout", "0.5", "--keepalive-timeout", "0.5")

    def test_an_idle_daemon_wakes_once_a_sample(self):
        """The timer that expires connections sleeps while there are none, and until the
        earliest deadline while there are: a daemon with nothing to do wakes for its sample
        (here once a second), not four times more often, with or without an idle client."""
        daemon = Daemon(args=("--sample-interval", "1"))
        self.addCleanup(daemon.cleanup)

        def wakeups():
            with open("/proc/%d/status" % daemon.proc.pid) as handle:
                return int(re.search(r"voluntary_ctxt_switches:\s+(\d+)", handle.read()).group(1))
        self.assertEqual(daemon.get("/api/system")[0], 200)    # a connection came and went
        time.sleep(0.5)                                 # its deadline swept; then nothing to do
        before = wakeups()
        time.sleep(1.5)
        self.assertLessEqual(wakeups() - before, 4)     # 1-2 here; with the sweeper awake, 7 or 8
        with socket.create_connection(("127.0.0.1", daemon.port)) as sock:     # kept alive, idle
            sock.sendall(b"GET /api/system HTTP/1.1\r\nHost: localhost\r\n\r\n")
            self.assertEqual(status_of(read_one_response(sock)), 200)
            time.sleep(0.3)
            before = wakeups()
            time.sleep(1.5)
            self.assertLessEqual(wakeups() - before, 4)

    def test_a_head_begun_on_an_idle_connection_gets_its_408_in_time(self):
        """The sweeper sleeps until the earliest deadline; a head begun meanwhile on a
        keep-alive connection has a nearer one, and is still answered 408 on time."""
        daemon = Daemon(args=("--header-timeout", "1", "--keepalive-timeout", "30"))
        self.addCleanup(daemon.cleanup)
        with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
            sock.sendall(b"GET /api/system HTTP/1.1\r\nHost: localhost\r\n\r\n")
            self.assertEqual(status_of(read_one_response(sock)), 200)
            time.sleep(1.2)                             # the sweeper asleep until 30 s, or 1 s at most
            started = time.monotonic()
            sock.sendall(b"GET /api/system HTTP/1.1\r\n")
            raw = recv_all(sock, 10)
            self.assertEqual(status_of(raw), 408)
            self.assertLess(time.monotonic() - started, 5)

    def test_stuck_header_gets_408_after_the_header_timeout(self):
        with socket.create_connection(("127.0.0.1", self.daemon.port)) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n")
            raw = recv_all(sock, 5)
        self.assertEqual(status_of(raw), 408)
        self.assertEqual(json_of(raw)["error"]["code"], "REQUEST_TIMEOUT")

    def test_stuck_body_gets_408_and_an_idle_connection_is_closed_quietly(self):
        with socket.create_connection(("127.0.0.1", self.daemon.port)) as sock:
            sock.sendall(b"POST /api/processes HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 10\r\n\r\n{")
            self.assertEqual(status_of(recv_all(sock, 5)), 408)
        with socket.create_connection(("127.0.0.1", self.daemon.port)) as sock:
            sock.sendall(b"GET /api/system HTTP/1.1\r\nHost: localhost\r\n\r\n")
            raw = recv_all(sock, 5)                 # the answer, then a close without a 408
        self.assertEqual(status_of(raw), 200)
        self.assertNotIn(b"HTTP/1.1 408", raw)


# -- TLS ---------------------------------------------------------------------------------------

def make_certificate(directory, name, common_name="localhost"):
    """A throwaway self-signed certificate made with openssl: (cert path, key path)."""
    cert, key = os.path.join(directory, name + ".crt"), os.path.join(directory, name + ".key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=" + common_name,
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, **CAPTURE, timeout=30)
    return cert, key


@unittest.skipUnless(shutil.which("openssl"), "needs openssl to make a throwaway certificate")
class TestTls(unittest.TestCase):
    def setUp(self):
        import ssl
        self.dir = temp_dir(self, "pmd-tls-")
        self.cert, self.key = make_certificate(self.dir, "one")
        self.daemon = Daemon(args=("--tls-cert", self.cert, "--tls-key", self.key),
                             env={"PMDAEMON_API_KEY": "tls-key"})
        self.addCleanup(self.daemon.cleanup)
        self.ssl = ssl

    def client_context(self, cafile, **versions):
        context = self.ssl.create_default_context(cafile=cafile)
        for name, value in versions.items():
            setattr(context, name, value)
        return context

    def https_get(self, path, cafile, headers=None):
        conn = http.client.HTTPSConnection("127.0.0.1", self.daemon.port, timeout=10,
                                           context=self.client_context(cafile))
        self.addCleanup(conn.close)
        conn.request("GET", path, headers=dict({"Authorization": "Bearer tls-key"}, **(headers or {})))
        response = conn.getresponse()
        return response.status, response.read(), conn

    def test_a_request_sent_with_the_handshake_leaves_later_deadlines_enforced(self):
        """A whole request sent with the client's last handshake message is answered before
        its connection's task ever yields; the deadline sweeper it woke must live on: a later
        partial head still gets its 408."""
        daemon = Daemon(args=("--tls-cert", self.cert, "--tls-key", self.key, "--header-timeout", "1"),
                        env={"PMDAEMON_API_KEY": "tls-key"})
        self.addCleanup(daemon.cleanup)
        context = self.ssl.SSLContext(self.ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(self.cert)
        context.check_hostname = False

        def exchange(request):
            """Handshake through memory, then `request` in the same write as the last of it."""
            incoming, outgoing = self.ssl.MemoryBIO(), self.ssl.MemoryBIO()
            tls = context.wrap_bio(incoming, outgoing)
            with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
                while True:
                    try:
                        tls.do_handshake()
                        break
                    except self.ssl.SSLWantReadError:
                        sock.sendall(outgoing.read())
                        incoming.write(sock.recv(65536))
                tls.write(request)
                sock.sendall(outgoing.read())
                answer = b""
                while True:                         # until the daemon's close_notify
                    data = sock.recv(65536)
                    if not data:
                        return answer
                    incoming.write(data)
                    try:
                        chunk = tls.read(65536)
                        while chunk:
                            answer += chunk
                            chunk = tls.read(65536)
                        return answer                   # b"": the daemon's close_notify
                    except self.ssl.SSLWantReadError:
                        continue
                    except self.ssl.SSLZeroReturnError:
                        return answer
        for _ in range(2):
            self.assertEqual(status_of(exchange(b"GET /api/system HTTP/1.1\r\nHost: localhost\r\n"
                                                b"Authorization: Bearer tls-key\r\nConnection: close\r\n\r\n")), 200)
            self.assertEqual(status_of(exchange(b"GET /api/system HTTP/1.1\r\nHost: loc")), 408)

    def test_silent_connections_before_the_handshake_are_capped_and_bounded(self):
        """Connections that never start TLS count from accept: at most max_connections in
        all and MAX_TLS_HANDSHAKES at once in handshake, each for header_timeout at most."""
        daemon = Daemon(args=("--tls-cert", self.cert, "--tls-key", self.key, "--max-connections", "100",
                              "--header-timeout", "2"), env={"PMDAEMON_API_KEY": "tls-key"})
        self.addCleanup(daemon.cleanup)
        before = rss_kib(daemon.proc.pid)
        silent = []
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
            self.addCleanup(sock.close)
            silent.append(sock)

        def closed_by_the_daemon():
            count = 0
            for sock in silent:
                sock.setblocking(False)
                try:
                    count += sock.recv(1) == b""
                except BlockingIOError:
                    pass
                except ConnectionError:
                    count += 1
            return count
        allowed = pmdaemon.MAX_TLS_HANDSHAKES
        # Before the 2 s deadline, everything past the handshake limit has been let go.
        wait_until(lambda: closed_by_the_daemon() >= 200 - allowed, 1.5, message="the connections past the cap closed")
        self.assertLess(rss_kib(daemon.proc.pid) - before, 32 * 1024)
        wait_until(lambda: closed_by_the_daemon() == 200, 5, message="the silent ones closed at the deadline")
        self.assertEqual(self.https_get("/api/system", self.cert)[0], 200)     # and it serves again

    def test_https_and_wss_on_one_port_tls_1_2_or_newer(self):
        status, body, _ = self.https_get("/api/system", self.cert)
        self.assertEqual(status, 200)
        self.assertIn(b'"cpu"', body)
        import warnings
        with warnings.catch_warnings():             # old versions are deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            old = self.client_context(self.cert)        # TLS 1.0 and 1.1 only (ssl.TLSVersion is 3.7+)
            old.options |= self.ssl.OP_NO_TLSv1_2 | self.ssl.OP_NO_TLSv1_3
        with self.assertRaises(self.ssl.SSLError):
            with socket.create_connection(("127.0.0.1", self.daemon.port), timeout=5) as raw:
                old.wrap_socket(raw, server_hostname="localhost").close()
        with socket.create_connection(("127.0.0.1", self.daemon.port), timeout=5) as raw:
            tls = self.client_context(self.cert).wrap_socket(raw, server_hostname="localhost")
            key = base64.b64encode(os.urandom(16)).decode()
            tls.sendall(("GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer tls-key\r\n\r\n"
                         % key).encode())
            self.assertTrue(tls.recv(4096).startswith(b"HTTP/1.1 101 Switching Protocols\r\n"))
            tls.close()

    def test_sigusr1_reloads_the_certificate_and_keeps_connections(self):
        _, _, kept = self.https_get("/api/system", self.cert)
        new_cert, new_key = make_certificate(self.dir, "two")
        os.replace(new_cert, self.cert)
        os.replace(new_key, self.key)
        self.daemon.proc.send_signal(signal.SIGUSR1)
        wait_until(lambda: self.served_certificate() == read_text(self.cert), message="the new certificate")
        kept.request("GET", "/api/system", headers={"Authorization": "Bearer tls-key"})   # the old connection
        self.assertEqual(kept.getresponse().status, 200)

    def served_certificate(self):
        with socket.create_connection(("127.0.0.1", self.daemon.port), timeout=5) as raw:
            context = self.ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, self.ssl.CERT_NONE
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                return self.ssl.DER_cert_to_PEM_cert(tls.getpeercert(binary_form=True))

    def test_a_key_without_tls_off_loopback_is_warned_about(self):
        home = temp_dir(self, "pmd-warn-")
        proc = subprocess.Popen([PY, PMDAEMON, "web", "--host", "0.0.0.0", "--port", "0", "--home", home],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                                env=dict(os.environ, PMDAEMON_API_KEY="k"))
        try:
            self.assertIn("listening on http://0.0.0.0:", proc.stdout.readline())
        finally:
            proc.terminate()
            _, errors = proc.communicate(timeout=15)
        self.assertIn("warning: 0.0.0.0 is not loopback and there is no TLS", errors)

    def test_the_cli_speaks_https(self):
        result = subprocess.run([PY, PMDAEMON, "ls", "--url", "https://localhost:%d" % self.daemon.port],
                                **CAPTURE, universal_newlines=True, timeout=30,
                                env=dict(os.environ, SSL_CERT_FILE=self.cert, PMDAEMON_API_KEY="tls-key"))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(result.stdout.startswith("id  name"))


@unittest.skipUnless(shutil.which("openssl"), "needs openssl to make a throwaway certificate")
class TestTlsReload(unittest.TestCase):
    def test_a_mismatched_pair_is_refused_and_the_old_certificate_stays(self):
        import ssl
        directory = temp_dir(self, "pmd-tls-")
        cert, key = make_certificate(directory, "one")
        first = read_text(cert)
        two_cert, two_key = make_certificate(directory, "two")
        daemon = Daemon(args=("--tls-cert", cert, "--tls-key", key), env={"PMDAEMON_API_KEY": "tls-key"})
        self.addCleanup(daemon.cleanup)

        def served():
            with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as raw:
                context = ssl.create_default_context()
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    return ssl.DER_cert_to_PEM_cert(tls.getpeercert(binary_form=True))
        shutil.copy(two_cert, cert)                 # the new certificate, but the old key
        daemon.proc.send_signal(signal.SIGUSR1)
        log_path = os.path.join(daemon.home, "pmdaemon.log")
        wait_until(lambda: "TLS files not reloaded, the old certificate stays" in read_text(log_path),
                   message="the refused reload to be logged")
        self.assertEqual(served(), first)
        shutil.copy(two_key, key)                   # now the pair matches
        daemon.proc.send_signal(signal.SIGUSR1)
        wait_until(lambda: served() == read_text(two_cert), message="the new certificate")


# -- the Daemon: its home, its code cache, its state across restarts, its shutdown -------------

class TestDaemonLifecycle(unittest.TestCase):
    def setUp(self):
        self.home = temp_dir(self, "pmd-life-")

    def daemon(self):
        daemon = Daemon(home=self.home)
        self.addCleanup(daemon.cleanup)
        return daemon

    def test_nothing_the_api_acknowledged_is_lost_to_a_kill_9(self):
        """Each kind of change the API acknowledges, then SIGKILL of the daemon at once: the
        next daemon shows exactly what was acknowledged, with one OS process per running
        entry and none for a stopped or deleted one."""
        self.survives_kill_9_after_each([
            ("create", lambda d: d.start("a", "sleep", ["60"]), {"a": "online"}),
            ("stop", lambda d: d.post("/api/processes/a/stop"), {"a": "stopped"}),
            ("start", lambda d: d.post("/api/processes/a/start"), {"a": "online"}),
            ("restart", lambda d: d.post("/api/processes/a/restart"), {"a": "online"}),
            ("PATCH", lambda d: d.request("PATCH", "/api/processes/a", {"env": {"MODE": "patched"}}), {"a": "online"}),
            ("scale", lambda d: d.request("PATCH", "/api/processes/a", {"instances": 2}),
             {"a-0": "online", "a-1": "online"}),
            ("delete", lambda d: d.request("DELETE", "/api/processes/a"), {}),
        ])

    def test_nothing_the_cli_acknowledged_is_lost_to_a_kill_9(self):
        """The same for the CLI's apply, save and resurrect."""
        apps = os.path.join(temp_dir(self), "apps.json")
        with open(apps, "w") as handle:
            json.dump({"apps": [{"name": "filed", "script": "sleep", "args": ["60"]}]}, handle)
        dump = os.path.join(temp_dir(self), "dump.json")
        environ = dict(os.environ, PMDAEMON_HOME=self.home)
        environ.pop("PMDAEMON_URL", None)

        def cli(*args):
            result = subprocess.run([PY, PMDAEMON] + list(args) + ["--no-daemon"], **CAPTURE,
                                    universal_newlines=True, timeout=60, env=environ)
            self.assertEqual(result.returncode, 0, result.stderr)
        self.survives_kill_9_after_each([
            ("apply", lambda d: cli("apply", apps), {"filed": "online"}),
            ("save+delete", lambda d: (cli("save", dump), d.request("DELETE", "/api/processes/filed")), {}),
            ("resurrect", lambda d: cli("resurrect", dump), {"filed": "online"}),
            ("stop again", lambda d: d.post("/api/processes/filed/stop"), {"filed": "stopped"}),
        ])

    def survives_kill_9_after_each(self, steps):
        daemon = self.daemon()
        for kind, change, expected in steps:
            with self.subTest(change=kind):
                change(daemon)
                daemon.proc.kill()                      # right after the answer
                daemon.proc.wait()
                daemon = self.daemon()
                listed = {p["name"]: p["status"] for p in daemon.get("/api/processes")[2]["processes"]}
                self.assertEqual(listed, expected)
                for name, status in expected.items():
                    self.assertEqual(len(self.processes_named(name)), 1 if status == "online" else 0, name)
                if kind == "PATCH":
                    self.assertEqual(daemon.process("a")["config"]["env"], {"MODE": "patched"})
        self.assertEqual(daemon.terminate(), 0)

    def test_no_cgroup_is_left_behind_at_shutdown(self):
        daemon = self.daemon()
        status, _, body = daemon.post("/api/processes", {"name": "capped", "script": "sleep", "args": ["60"],
                                                         "memory_limit": "64M"})
        if status == 400:
            self.skipTest("no writable cgroups here: " + body["error"]["message"])
        with open("/proc/%d/cgroup" % daemon.proc.pid) as handle:
            lines = [line.strip().split(":", 2) for line in handle]
        tag = "pmdaemon-" + __import__("hashlib").sha256(self.home.encode()).hexdigest()[:8]
        places = [os.path.join("/sys/fs/cgroup", controllers, path.lstrip("/"), tag)
                  for _, controllers, path in lines if controllers in ("memory", "cpu,cpuacct", "cpu")]
        places = [place for place in places if os.path.isdir(place)]
        if not places:                              # v2: the process cgroups sit beside "daemon"
            base = os.path.join("/sys/fs/cgroup", [path for number, _, path in lines if number == "0"][0].lstrip("/"))
            places = [base]
        self.assertTrue(any(entry.startswith("proc-") for place in places for entry in os.listdir(place)), places)
        self.assertEqual(daemon.terminate(), 0)
        left = [os.path.join(place, entry) for place in places if os.path.isdir(place)
                for entry in os.listdir(place) if entry.startswith("proc-")]
        self.assertEqual(left, [])
        if "memory" in {controllers for _, controllers, _ in lines}:               # v1: ours are gone too
            self.assertEqual([place for place in places if os.path.exists(place)], [])

    @unittest.skipUnless(shutil.which("prlimit"), "needs prlimit (util-linux) to start a daemon under a low file limit")
    def test_out_of_descriptors_is_one_clear_state(self):
        """Under `ulimit -n 64`: creates past the room are 503 OUT_OF_DESCRIPTORS (never a 507 or
        a half-started process), a flood of connections is said once in the log, no traceback,
        and SIGTERM still stops every child."""
        daemon = Daemon(home=self.home, wrapper=["prlimit", "--nofile=64:64", "--"])
        self.addCleanup(daemon.cleanup)
        answers = [daemon.post("/api/processes", {"name": "f%d" % index, "script": "sleep", "args": ["60"]})
                   for index in range(40)]
        statuses = [status for status, _, _ in answers]
        self.assertEqual(set(statuses), {201, 503}, statuses)
        refused = [body for status, _, body in answers if status == 503]
        self.assertEqual(refused[0]["error"]["code"], "OUT_OF_DESCRIPTORS")
        self.assertIn("raise it (ulimit -n, or LimitNOFILE= under systemd)", refused[0]["error"]["message"])
        running = [p["pid"] for p in daemon.get("/api/processes")[2]["processes"]]
        self.assertEqual(len(running), statuses.count(201))
        self.assertTrue(all(running))
        flood = []
        for _ in range(40):                             # more connections than descriptors left
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", daemon.port))
            flood.append(sock)
        wait_until(lambda: "cannot accept connections" in read_text(os.path.join(self.home, "pmdaemon.log")),
                   message="the accept trouble said")
        for sock in flood:
            sock.close()
        wait_until(lambda: daemon.get("/api/system")[0] == 200, message="the daemon answering again")
        self.assertEqual(daemon.terminate(), 0)
        log_text = read_text(os.path.join(self.home, "pmdaemon.log"))
        self.assertNotIn("Traceback", log_text + daemon.stderr_text)
        self.assertEqual(log_text.count("cannot accept connections"), 1)
        self.assertEqual([pid for pid in running if pid_alive(pid)], [])

    def processes_named(self, name):
        """The live OS processes of this home's process `name`."""
        wanted = {b"PMDAEMON_PROCESS_NAME=" + name.encode(), b"PMDAEMON_HOME=" + self.home.encode()}
        return [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                if pid_alive(pid) and wanted <= set(read_environ(pid).split(b"\0"))]

    def test_a_stderr_nobody_reads_does_not_stop_the_daemon(self):
        """A crash loop logs lines without end; with its stderr a full pipe (shrunk here to one
        page) the daemon keeps supervising and answering, and pmdaemon.log has every line."""
        import fcntl
        daemon = self.daemon()
        fcntl.fcntl(daemon.proc.stderr.fileno(), 1031, 4096)          # F_SETPIPE_SZ: one page
        daemon.start("loud", "false", [], min_uptime=0, max_restarts=1_000_000, restart_delay=0)
        wait_until(lambda: daemon.process("loud")["restarts"] >= 200, 20, message="200 restarts")
        self.assertEqual(daemon.get("/api/system")[0], 200)
        logged = read_text(os.path.join(self.home, "pmdaemon.log")).count("loud restarted")
        self.assertGreaterEqual(logged, 200)
        self.assertLess(len(daemon.proc.stderr.read1(1 << 20)), logged * 60)   # stderr lost lines
        daemon.request("DELETE", "/api/processes/loud")

    def test_the_daemon_runs_from_its_private_code_cache(self):
        """Compiling the script costs ~20 MiB the daemon would keep: `web` re-executes itself
        from its code compiled into the home; a stale cache is replaced, a planted link refused."""
        with open(PMDAEMON, "rb") as handle:
            header = pmdaemon.code_cache_header(handle.read(), PMDAEMON)
        cache = os.path.join(self.home, "pmdaemon.pyc")
        for planted in (None, "stale"):
            with self.subTest(planted=planted):
                if planted:
                    with open(cache, "r+b") as handle:
                        handle.write(b"\0" * 16)
                daemon = Daemon(home=self.home, script=PMDAEMON)
                self.addCleanup(daemon.cleanup)
                with open("/proc/%d/cmdline" % daemon.proc.pid, "rb") as handle:
                    self.assertIn(cache.encode() + b"\0web\0", handle.read())
                self.assertEqual(daemon.get("/api/system")[0], 200)
                info = os.lstat(cache)
                self.assertEqual((stat_module.S_ISREG(info.st_mode), info.st_mode & 0o777), (True, 0o600))
                with open(cache, "rb") as handle:
                    self.assertEqual(handle.read(len(header)), header)
                self.assertEqual(daemon.terminate(), 0)
        decoy = os.path.join(temp_dir(self, "pmd-decoy-"), "decoy.pyc")
        with open(decoy, "wb") as handle:
            handle.write(header + b"not code")
        os.unlink(cache)
        os.symlink(decoy, cache)
        with self.assertRaisesRegex(AssertionError, "pmdaemon.pyc is a symbolic link"):
            Daemon(home=self.home, script=PMDAEMON)
        with open(decoy, "rb") as handle:
            self.assertEqual(handle.read(), header + b"not code")

    def test_a_code_cache_made_from_another_copy_is_never_used(self):
        """Two identical copies of the file: the cache one left in the home must not run the
        other, whose imports would come from the first one's directory."""
        copies = temp_dir(self, "pmd-copies-")
        first, second = os.path.join(copies, "a"), os.path.join(copies, "b")
        for directory in (first, second):
            os.mkdir(directory)
            shutil.copy(PMDAEMON, directory)
        marker = os.path.join(copies, "planted-ran")

        def run_web(directory):
            daemon = Daemon(home=self.home, script=os.path.join(directory, "pmdaemon.py"))
            self.addCleanup(daemon.cleanup)
            self.assertEqual(daemon.get("/api/system")[0], 200)
            return daemon
        self.assertEqual(run_web(first).terminate(), 0)
        # Planted beside the first copy: ctypes is imported by the daemon after its start.
        with open(os.path.join(first, "ctypes.py"), "w") as handle:
            handle.write("open(%r, 'w').close()\nraise ImportError('planted')\n" % marker)
        self.assertEqual(run_web(second).terminate(), 0)
        self.assertFalse(os.path.exists(marker), "a module beside the other copy ran")
        # Nor one beside the copy that runs: from the cache, only the home is searched.
        with open(os.path.join(second, "ctypes.py"), "w") as handle:
            handle.write("open(%r, 'w').close()\nraise ImportError('planted')\n" % marker)
        self.assertEqual(run_web(second).terminate(), 0)
        self.assertFalse(os.path.exists(marker), "a module beside the running copy ran")
        with open(os.path.join(second, "pmdaemon.py"), "rb") as handle:
            header = pmdaemon.code_cache_header(handle.read(), os.path.join(second, "pmdaemon.py"))
        with open(os.path.join(self.home, "pmdaemon.pyc"), "rb") as handle:
            self.assertEqual(handle.read(len(header)), header)

    @AS_OTHER_USER
    def test_a_home_below_a_directory_others_can_change_is_refused(self):
        above = temp_dir(self, "pmd-above-")
        home = os.path.join(above, "home")
        environ = dict(os.environ, PMDAEMON_HOME=home)
        for mode, owner, why in ((0o755, NOBODY, "%s, above the home, belongs to uid 65534" % above),
                                 (0o777, 0, "%s, above the home, is writable by group or others (mode 777) "
                                            "and not sticky" % above)):
            os.chmod(above, mode)
            os.chown(above, owner, owner)
            result = subprocess.run([PY, PMDAEMON, "web", "--port", "0"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=environ, timeout=30)
            self.assertEqual(result.returncode, 1)
            self.assertIn(why, result.stderr.decode())
        os.chmod(above, 0o1777)                     # sticky, like /tmp: others cannot rename ours
        os.chown(above, 0, 0)
        daemon = Daemon(home=home)
        self.addCleanup(daemon.cleanup)
        self.assertEqual(daemon.get("/api/system")[0], 200)

    def test_state_is_restored_after_a_restart(self):
        first = self.daemon()
        first.start("keep", "sleep", ["60"], port=3501)
        first.post("/api/processes/keep/restart")
        online_pid = first.process("keep")["pid"]
        first.start("parked", "sleep", ["60"])
        first.post("/api/processes/parked/stop")
        first.start("gone", "sleep", ["60"])
        first.request("DELETE", "/api/processes/gone")
        self.assertEqual(first.terminate(), 0)
        self.assertFalse(pid_alive(online_pid))      # a graceful exit stops the children

        second = self.daemon()
        keep = second.process("keep")
        self.assertEqual((keep["id"], keep["status"], keep["port"], keep["restarts"]), (0, "online", 3501, 1))
        self.assertTrue(pid_alive(keep["pid"]))
        self.assertEqual(second.process("parked")["status"], "stopped")
        self.assertIsNone(second.process("gone"))
        self.assertEqual(second.start("fresh", "sleep", ["1"])["process"]["id"], 3)   # ids never reused
        second.terminate()

    @unittest.skipUnless(os.geteuid() == 0 and shutil.which("unshare"), "needs root to mask /proc files")
    def test_masked_proc_files_degrade_metrics_and_orphan_nothing(self):
        first = self.daemon()
        first.start("keep", "sleep", ["60"])
        self.assertEqual(first.terminate(), 0)
        mask = ("mount --bind /dev/null /proc/uptime && mount --bind /dev/null /proc/meminfo "
                "&& exec \"$0\" \"$@\"")
        if subprocess.run(["unshare", "-m", "sh", "-c", mask, "true"]).returncode:
            self.skipTest("cannot make a mount namespace here")
        second = Daemon(home=self.home, wrapper=["unshare", "-m", "sh", "-c", mask])
        self.addCleanup(second.cleanup)
        keep = second.process("keep")
        self.assertEqual(keep["status"], "online")
        self.assertTrue(pid_alive(keep["pid"]))
        system = second.get("/api/system")[2]
        self.assertEqual((system["uptime"], system["memory"]["total"]), (0, 0))
        self.assertGreater(system["cpu"]["cores"], 0)
        self.assertEqual(second.terminate(), 0)
        self.assertFalse(pid_alive(keep["pid"]))
        self.assertIn("cannot read uptime from /proc", second.stderr_text)

    def test_every_setting_survives_a_daemon_restart(self):
        logs = temp_dir(self, "pmd-restore-")
        first = self.daemon()
        settings = {"namespace": "batch", "stdin": True, "interpreter": "sh", "interpreter_args": ["-e"],
                    "umask": "027", "rlimits": {"nofile": 512}, "cron_restart": "0 3 * * *", "watch": ["."],
                    "watch_ignore": ["*.tmp"], "watch_delay": "2s", "out_file": os.path.join(logs, "o.log"),
                    "merge_logs": True, "log_date_format": "none", "autostart": False, "cwd": logs}
        with open(os.path.join(logs, "job.sh"), "w") as handle:
            handle.write("sleep 60\n")
        first.start("keep-all", "job.sh", **settings)
        before = first.process("keep-all")["config"]
        self.assertEqual(first.terminate(), 0)
        second = self.daemon()
        self.assertEqual(second.process("keep-all")["config"], before)
        self.assertEqual(second.process("keep-all")["status"], "stopped")      # autostart false stays
        second.terminate()

    def test_kill_9_then_restart_leaves_exactly_one_copy(self):
        first = self.daemon()
        first.start("before", "sleep", ["60"])
        first.request("DELETE", "/api/processes/before")
        first.start("survivor", "sleep", ["60"], env={"MODE": "kept"})
        first.post("/api/processes/survivor/restart")     # on disk before it is answered
        old_pid = first.process("survivor")["pid"]
        first.proc.kill()
        first.proc.wait()
        second = self.daemon()
        now = second.process("survivor")
        self.assertEqual((now["status"], now["id"], now["restarts"], now["config"]["env"]["MODE"]),
                         ("online", 1, 1, "kept"))
        self.assertFalse(pid_alive(old_pid))            # the orphan of the old run was stopped
        self.assertTrue(pid_alive(now["pid"]))
        copies = [p for p in os.listdir("/proc") if p.isdigit() and pid_alive(int(p))    # of this home only
                  and {b"PMDAEMON_PROCESS_NAME=survivor", b"PMDAEMON_HOME=" + self.home.encode()}
                  <= set(read_environ(int(p)).split(b"\0"))]
        self.assertEqual(copies, [str(now["pid"])])     # exactly one copy runs
        second.terminate()

    def test_follow_streams_end_with_the_final_chunk_on_shutdown(self):
        daemon = self.daemon()
        daemon.start("tail-me", "sh", ["-c", "echo hello; exec sleep 60"])
        wait_until(lambda: daemon.last_line("tail-me") == "hello", message="a line")
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
            sock.sendall(b"GET /api/logs/tail-me?follow=true&lines=1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
            received = b""
            while b"hello" not in received:
                received += sock.recv(65536)
            self.assertEqual(daemon.terminate(), 0)
            received += recv_all(sock, 10)
        self.assertTrue(received.endswith(b"\r\n0\r\n\r\n"), received[-80:])

    @unittest.skipUnless(os.geteuid() == 0 and shutil.which("mount"), "needs root to mount a small tmpfs")
    def test_a_full_disk_drops_log_lines_and_keeps_every_app_running(self):
        home = tempfile.mkdtemp(prefix="pmd-full-")
        self.addCleanup(os.rmdir, home)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", home]).returncode:
            self.skipTest("cannot mount a tmpfs here")
        self.addCleanup(subprocess.run, ["umount", "-l", home])
        progress = os.path.join(self.home, "progress")
        script = ("import sys, time\ni = 0\nwhile True:\n    i += 1\n    print('line', i, 'x' * 200, flush=True)\n"
                  "    if i %% 50 == 0:\n        open(%r, 'w').write(str(i))\n    time.sleep(0.002)" % progress)
        daemon = Daemon(home=home)
        self.addCleanup(daemon.cleanup)
        events = WsClient(daemon.port)
        self.addCleanup(events.close)
        pid = daemon.start("disk-app", PY, ["-c", script])["process"]["pid"]
        wait_until(lambda: int(read_text(progress) or 0) >= 100, message="the first lines")
        filler = os.path.join(home, "filler")
        with open(filler, "wb", buffering=0) as handle:     # fill the disk to the last byte
            with contextlib.suppress(OSError):
                while True:
                    handle.write(b"\0" * 4096)
        event = events.recv_message("process_event", match=lambda m: m["data"]["event"] == "log_write_error")
        self.assertEqual(event["data"]["error"], "No space left on device")
        before = int(read_text(progress) or 0)
        wait_until(lambda: int(read_text(progress) or 0) > before + 200, message="the app to keep writing")
        details = daemon.process("disk-app")
        self.assertEqual((details["status"], details["pid"]), ("online", pid))
        self.assertGreater(details["log_write_errors"], 0)
        # A create is answered 201 only once its line is synced into the journal (the room left in
        # its last block takes a few); then 507, and the process does not exist.
        for index in range(40):
            status, _, body = daemon.post("/api/processes", {"name": "disk-new-%d" % index, "script": "sleep",
                                                             "args": ["60"]})
            if status != 201:
                break
        self.assertEqual((status, body["error"]["code"]), (507, "STATE_NOT_SAVED"), body)
        self.assertIsNone(daemon.process("disk-new-%d" % index))
        os.unlink(filler)                                   # space again: lines are written again
        stuck_at = daemon.last_line("disk-app")
        wait_until(lambda: daemon.last_line("disk-app") != stuck_at, message="log lines to resume")
        self.assertEqual(daemon.terminate(), 0)
        # Whole lines only: what a full disk cut short was taken back, nothing is glued to it.
        with open(os.path.join(home, "logs", "disk-app-out.log")) as handle:
            torn = [line for line in handle.read().splitlines()
                    if not re.match(r"\d{4}-\d\d-\d\dT[\d:.]+Z line \d+ x{200}\Z", line)]
        self.assertEqual(torn, [])
        self.assertIn("disk-app", read_text(os.path.join(home, "state.json")))

    def assertError(self, result, status, code):
        got_status, _, body = result
        self.assertEqual((got_status, body["error"]["code"]), (status, code), body)

    def test_corrupt_state_is_moved_aside(self):
        with open(os.path.join(self.home, "state.json"), "w") as handle:
            handle.write("{not json")
        daemon = self.daemon()
        self.assertEqual(daemon.get("/api/processes")[2], {"processes": [], "total": 0})
        aside = [f for f in os.listdir(self.home) if f.startswith("state.json.corrupt-")]
        self.assertEqual(len(aside), 1)
        with open(os.path.join(self.home, aside[0])) as handle:
            self.assertEqual(handle.read(), "{not json")
        daemon.terminate()
        self.assertIn("state file %s is unreadable" % os.path.join(self.home, "state.json"), daemon.stderr_text)

    def test_a_bad_saved_entry_is_kept_aside_and_the_rest_restored(self):
        first = self.daemon()
        first.start("good", "sleep", ["60"])
        first.start("edited", "sleep", ["60"])
        first.terminate()
        path = os.path.join(self.home, "state.json")
        with open(path) as handle:
            state = json.load(handle)
        state["processes"][1]["config"]["args"] = "not a list"
        with open(path, "w") as handle:
            json.dump(state, handle)
        second = self.daemon()
        self.assertEqual(second.process("good")["status"], "online")
        self.assertIsNone(second.process("edited"))
        kept = [f for f in os.listdir(self.home) if f.startswith("state.json.rejected-")]
        self.assertEqual(len(kept), 1)
        with open(os.path.join(self.home, kept[0])) as handle:
            self.assertEqual(json.load(handle)[0]["name"], "edited")
        second.terminate()
        self.assertIn("cannot restore saved process 'edited': field 'args' must be an array", second.stderr_text)

    def test_a_busy_port_fails_before_any_child_starts(self):
        first = self.daemon()
        first.start("keeper", "sleep", ["60"])
        first.terminate()
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            result = subprocess.run([PY, PMDAEMON, "web", "--port", str(port)], **CAPTURE, universal_newlines=True,
                                    timeout=20, env=dict(os.environ, PMDAEMON_HOME=self.home))
        self.assertEqual(result.returncode, 1)
        self.assertIn("cannot listen on 127.0.0.1:%d" % port, result.stderr)
        with open(os.path.join(self.home, "state.json")) as handle:
            state = json.load(handle)
        self.assertEqual([(p["name"], p["status"], p["pid"]) for p in state["processes"]], [("keeper", "online", None)])

    def test_an_unusable_home_is_a_clear_error(self):
        path = os.path.join(self.home, "a-file")
        open(path, "w").close()
        result = subprocess.run([PY, PMDAEMON, "web", "--port", "0", "--home", path], **CAPTURE,
                                universal_newlines=True, timeout=10)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.strip(), "pmdaemon: refusing to use %s as the home: %s is not a directory"
                         % (path, path))

    def start_web(self, home):
        return subprocess.run([PY, PMDAEMON, "web", "--port", "0", "--home", home], **CAPTURE,
                              universal_newlines=True, timeout=10)

    def test_a_new_home_and_everything_in_it_is_private(self):
        home = os.path.join(self.home, "fresh")
        daemon = Daemon(home=home)
        self.addCleanup(daemon.cleanup)
        daemon.start("private", "sh", ["-c", "echo hi; exec sleep 60"])
        wait_until(lambda: daemon.last_line("private") == "hi", message="a log line")
        self.assertEqual(daemon.terminate(), 0)
        modes = {name: oct(os.stat(os.path.join(home, name)).st_mode & 0o777)
                 for name in ("", "logs", "state.json", "pmdaemon.lock", "pmdaemon.log", "logs/private-out.log")}
        self.assertEqual(modes, {"": "0o700", "logs": "0o700", "state.json": "0o600", "pmdaemon.lock": "0o600",
                                 "pmdaemon.log": "0o600", "logs/private-out.log": "0o600"})

    def test_a_home_others_can_write_is_refused(self):
        os.chmod(self.home, 0o777)
        result = self.start_web(self.home)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.strip(), "pmdaemon: refusing to use %s as the home: %s is writable by "
                         "group or others (mode 777); run: chmod go-w %s" % (self.home, self.home, self.home))
        os.chmod(self.home, 0o755)                  # readable is fixable: it is tightened, files too
        with open(os.path.join(self.home, "state.json"), "w") as handle:
            handle.write('{"processes": []}')
        os.chmod(os.path.join(self.home, "state.json"), 0o644)
        daemon = self.daemon()
        daemon.terminate()
        self.assertEqual(oct(os.stat(self.home).st_mode & 0o777), "0o700")
        self.assertEqual(oct(os.stat(os.path.join(self.home, "state.json")).st_mode & 0o777), "0o600")

    def test_links_in_the_home_are_refused_never_followed(self):
        target = os.path.join(temp_dir(self, "pmd-target-"), "victim")
        with open(target, "w") as handle:
            handle.write("precious\n")
        for name in ("pmdaemon.lock", "logs/app-out.log", "state.json.tmp-1234", "state.json"):
            with self.subTest(name=name):
                os.makedirs(os.path.join(self.home, "logs"), exist_ok=True)
                link = os.path.join(self.home, name)
                os.symlink(target, link)
                result = self.start_web(self.home)
                os.unlink(link)
                self.assertEqual(result.returncode, 1)
                self.assertIn("%s is a symbolic link; pmdaemon never writes through links: remove it" % link,
                              result.stderr)
                self.assertEqual(read_text(target), "precious\n")

    @unittest.skipUnless(os.geteuid() == 0, "needs root to plant a file as another user")
    def test_a_file_planted_by_another_user_is_refused(self):
        planted = os.path.join(self.home, "state.json")
        with open(planted, "w") as handle:
            json.dump({"processes": [{"id": 0, "name": "evil", "config": {"name": "evil", "script": "sh"}}]}, handle)
        os.chown(planted, NOBODY, NOBODY)
        result = self.start_web(self.home)
        self.assertEqual(result.returncode, 1)
        self.assertIn("%s belongs to uid 65534, not to this user (uid 0)" % planted, result.stderr)

    def test_out_of_range_options_are_usage_errors(self):
        for option, value, message in (("--port", "70000", "argument --port: 70000 is not between 0 and 65535"),
                                        ("--sample-interval", "0", "argument --sample-interval: 0 is not between 0.05 and 3600"),
                                        ("--port", "x", "argument --port: 'x' is not a whole number")):
            result = subprocess.run([PY, PMDAEMON, "web", option, value], **CAPTURE, universal_newlines=True, timeout=10,
                                    env=dict(os.environ, PMDAEMON_HOME=self.home))
            self.assertEqual(result.returncode, 2)
            self.assertIn(message, result.stderr)

    def test_second_daemon_on_the_same_home_refuses(self):
        first = self.daemon()
        environ = dict(os.environ, PMDAEMON_HOME=self.home)
        result = subprocess.run([PY, PMDAEMON, "web", "--port", "0"], env=environ, **CAPTURE, timeout=10)
        self.assertEqual(result.returncode, 1)
        self.assertIn(("another daemon (pid %d) is already running" % first.proc.pid).encode(), result.stderr)
        first.terminate()


# -- WebSocket sessions ------------------------------------------------------------------------

def flood_script(go_file, lines=16000):
    """A child that waits for go_file, then prints `lines` lines of ~220 bytes (3.5 MB, more
    than a WebSocket client's send buffer and socket buffers together) at full speed."""
    return ("import os, sys, time\nwhile not os.path.exists(%r): time.sleep(0.01)\n"
            "for i in range(%d): print('x' * 200, i)\nsys.stdout.flush()\ntime.sleep(60)" % (go_file, lines))


def wait_for_flood(daemon, name, lines=16000):
    """Until the daemon has logged the flood's last line; generous, since it depends on the box."""
    wait_until(lambda: daemon.last_line(name).endswith(" %d" % (lines - 1)), timeout=60, interval=0.1,
               message="the whole flood")


class WsClient:
    """A blocking WebSocket client for the tests, speaking through pmdaemon's WsProtocol (the
    client's side). Pings are not answered unless a test sends the pong itself."""

    def __init__(self, port, path="/ws", headers=None, timeout=10, receive_buffer=None):
        self.sock = socket.socket()
        if receive_buffer:              # a small window makes a client that stops reading visible
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        request, key = pmdaemon.client_handshake(path, "127.0.0.1:%d" % port, headers)
        self.sock.sendall(request)
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            buffer += chunk
        head, _, rest = buffer.partition(b"\r\n\r\n")
        self.head = head.decode("latin-1")
        self.status = pmdaemon.check_handshake_reply(head, key)
        self.protocol = pmdaemon.WsProtocol(client=True)
        self.events = collections.deque()
        if self.status == 101:
            self.events.extend(self.protocol.receive_data(rest))
        else:
            length = int(self.head.lower().split("content-length: ")[1].split("\r\n")[0])
            while len(rest) < length:
                rest += self.sock.recv(65536)
            self.body = json.loads(rest[:length].decode())

    def send(self, opcode, payload=b"", fin=True):
        self.sock.sendall(pmdaemon.encode_frame(opcode, payload, fin, os.urandom(4)))

    def send_json(self, value):
        self.send(1, json.dumps(value).encode())

    def recv(self):
        """The next WsEvent (kind, data) from the server."""
        while not self.events:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed")
            self.events.extend(self.protocol.receive_data(chunk))
        return self.events.popleft()

    def recv_message(self, wanted=None, timeout=10, match=lambda message: True):
        """The next JSON message of type `wanted` that satisfies match (others are skipped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            event = self.recv()
            if event.kind == "text":
                message = json.loads(event.data)
                if (wanted is None or message["type"] == wanted) and match(message):
                    return message
        raise AssertionError("no %s message within %s s" % (wanted, timeout))

    def recv_close(self, timeout=10):
        """The close code the server sends (skipping data frames), None for a close without one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            event = self.recv()
            if event.kind == "close":
                return None if event.data[0] == 1005 else event.data[0]
        raise AssertionError("no close frame")

    def close(self):
        self.sock.close()


class TestWebSocket(DaemonTestCase):
    daemon_args = ("--ws-slow-grace", "0.5")

    def connect(self, **kwargs):
        return self.ws(**kwargs)

    def test_connect_receives_current_state_at_once(self):
        self.daemon.start("ws-a", "sleep", ["60"])
        client = self.connect()
        self.assertEqual(client.status, 101)
        update = client.recv_message("process_update", timeout=2, match=lambda m: m["data"]["name"] == "ws-a")
        self.assertEqual(update["data"]["status"], "online")
        self.assertTrue({"id", "name", "status", "pid", "cpu", "memory", "timestamp"} <= set(update["data"]))
        system = client.recv_message("system_update", timeout=2)
        self.assertTrue({"cpu", "memory", "load", "timestamp"} <= set(system["data"]))
        self.assertEqual(set(system["data"]["memory"]), {"usage_percent", "used"})
        self.daemon.request("DELETE", "/api/processes/ws-a")

    def test_a_tick_carries_only_the_processes_that_changed(self):
        self.daemon.start("ws-quiet", "sleep", ["60"])
        self.daemon.start("ws-busy", PY, ["-c", "while True: pass"])
        client = self.connect()
        counts = {"ws-quiet": 0, "ws-busy": 0}
        ticks = 0
        for _ in range(3):                              # the state on connect; the new ones settle
            client.recv_message("system_update")
        while ticks < 6:                                # then six ticks of 0.2 s
            message = client.recv_message()
            if message["type"] == "system_update":
                ticks += 1
            elif message["type"] == "process_update" and message["data"]["name"] in counts:
                counts[message["data"]["name"]] += 1
        # A sleeping process whose pid, status, cpu and memory stay the same is not repeated; a
        # busy one's cpu moves. (Every 30 s a tick carries every process, for lossy clients.)
        self.assertEqual(counts["ws-quiet"], 0, counts)
        self.assertGreaterEqual(counts["ws-busy"], 3, counts)
        self.daemon.request("DELETE", "/api/processes/ws-quiet")
        self.daemon.request("DELETE", "/api/processes/ws-busy")

    def test_process_events_and_updates_on_change(self):
        client = self.connect()
        self.daemon.start("ws-b", "sleep", ["60"])
        started = client.recv_message("process_event", match=lambda m: m["data"]["process"] == "ws-b")
        self.assertEqual(started["data"]["event"], "started")
        self.assertRegex(started["data"]["timestamp"], r"Z$")
        self.daemon.post("/api/processes/ws-b/stop")
        client.recv_message("process_update", match=lambda m: m["data"]["name"] == "ws-b"
                            and m["data"]["status"] == "stopped")
        client.recv_message("process_event", match=lambda m: m["data"]["event"] == "stopped")
        self.daemon.request("DELETE", "/api/processes/ws-b")
        client.recv_message("process_event", match=lambda m: m["data"]["event"] == "deleted"
                            and m["data"]["process"] == "ws-b")

    def test_exit_and_crash_events_carry_the_exit_code(self):
        client = self.connect()
        self.daemon.start("ws-c", PY, ["-c", "raise SystemExit(7)"], autorestart=False)
        exited = client.recv_message("process_event", match=lambda m: m["data"]["process"] == "ws-c"
                                     and m["data"]["event"] == "exited")
        self.assertEqual((exited["data"]["exit_code"], exited["data"]["signal"]), (7, None))
        client.recv_message("process_event", match=lambda m: m["data"]["event"] == "crashed")
        self.daemon.request("DELETE", "/api/processes/ws-c")

    def test_log_subscription_delivers_new_lines(self):
        script = "import sys, time\nfor line in sys.stdin: pass\n" \
                 "while True:\n    print('tick', flush=True); time.sleep(0.1)"
        self.daemon.start("ws-log", PY, ["-c", script])
        client = self.connect()
        client.send_json({"type": "subscribe", "channel": "logs", "process": "ws-log"})
        ack = client.recv_message("subscribed")
        self.assertRegex(ack["data"].pop("timestamp"), r"Z$")
        self.assertEqual(ack["data"], {"channel": "logs", "process": "ws-log"})
        line = client.recv_message("log")
        self.assertEqual(line["data"]["process"], "ws-log")
        self.assertEqual(line["data"]["message"], "tick")
        self.assertEqual(line["data"]["type"], "stdout")
        client.send_json({"type": "subscribe", "channel": "logs", "process": "nobody"})
        error = client.recv_message("error")
        self.assertEqual(error["data"]["code"], "PROCESS_NOT_FOUND")
        client.send_json({"type": "unsubscribe", "channel": "logs", "process": "ws-log"})
        client.recv_message("unsubscribed")
        seen = []
        while seen.count("system_update") < 4:            # four ticks (0.8 s) of a 10 lines/s process
            seen.append(client.recv_message()["type"])
        self.assertNotIn("log", seen)
        self.daemon.request("DELETE", "/api/processes/ws-log")

    def test_malformed_commands_get_errors_and_the_connection_stays(self):
        client = self.connect()
        client.send(1, b"not json")
        error = client.recv_message("error")["data"]
        self.assertEqual(error["code"], "INVALID_JSON")
        self.assertTrue(error["message"].startswith("invalid JSON"))
        client.send_json({"type": "launch"})
        self.assertEqual(client.recv_message("error")["data"]["message"],
                         "unknown command type 'launch' (subscribe, unsubscribe, filter, ping)")
        client.send_json({"type": "ping"})
        client.recv_message("pong")

    def test_filter_limits_what_a_client_receives(self):
        client = self.connect()
        client.send_json({"type": "filter", "types": ["process_event"]})
        client.recv_message("filtered")
        self.daemon.start("ws-f", "sleep", ["60"])
        message = client.recv_message()
        self.assertEqual(message["type"], "process_event")
        self.daemon.request("DELETE", "/api/processes/ws-f")

    def test_a_command_that_cannot_run_gets_its_code_and_the_session_stays(self):
        client = self.connect()
        for command, code, text in (
                ({"type": "dance"}, "INVALID_COMMAND", "unknown command type 'dance' (subscribe, unsubscribe, filter, ping)"),
                ({"type": "subscribe", "channel": "news"}, "INVALID_COMMAND", "unknown channel 'news'; the channel is 'logs'"),
                ({"type": "subscribe", "channel": "logs", "process": "nope"}, "PROCESS_NOT_FOUND", "Process 'nope' not found")):
            client.send_json(command)
            error = client.recv_message("error")["data"]
            self.assertEqual((error["code"], error["message"]), (code, text))
        client.send_json({"type": "ping"})
        client.recv_message("pong")

    def test_the_101_carries_cors_headers_like_any_answer(self):
        own = "http://127.0.0.1:%d" % self.daemon.port
        client = self.connect(headers={"Origin": own})
        self.assertEqual(client.status, 101)
        self.assertIn("\r\nAccess-Control-Allow-Origin: %s\r\nVary: Origin" % own, client.head)
        self.assertNotIn("Connection: close", client.head)
        self.assertNotIn("Content-Length", client.head)

    def test_protocol_violation_closes_with_its_code(self):
        client = self.connect()
        client.sock.sendall(pmdaemon.encode_frame(1, b"unmasked"))
        self.assertEqual(client.recv_close(), 1002)
        client2 = self.connect()
        client2.send(1, b"\xff\xfe")
        self.assertEqual(client2.recv_close(), 1007)

    def test_ping_gets_pong_and_close_is_echoed(self):
        client = self.connect()
        client.send(9, b"hello")
        while True:
            event = client.recv()
            if event.kind == "pong":
                break
        self.assertEqual(event.data, b"hello")
        client.send(8, struct.pack("!H", 1000))
        self.assertEqual(client.recv_close(), 1000)

    def test_bad_handshakes(self):
        self.assertEqual(self.connect(headers={"Sec-WebSocket-Version": "8"}).status, 426)
        bad = self.connect(headers={"Sec-WebSocket-Key": "short"})
        self.assertEqual((bad.status, bad.body["error"]["code"]), (400, "BAD_REQUEST"))
        self.assertEqual(self.connect(headers={"Origin": "https://evil.example"}).status, 403)
        status, _, body = self.daemon.get("/ws")
        self.assertEqual((status, body["error"]["message"]), (400, "expected 'Upgrade: websocket' and 'Connection: Upgrade'"))
        self.assertEqual(self.connect(headers={"Origin": "http://localhost:5173"}).status, 403)
        self.assertEqual(self.connect(headers={"Origin": "http://127.0.0.1:%d" % self.daemon.port}).status, 101)

    def assertClosedAfterItsQueue(self, client):
        """A slow client reads what was queued for it (bounded), then a 1008 close."""
        received, code = 0, None
        while code is None:
            event = client.recv()
            if event.kind == "close":
                code = event.data[0]
            else:
                received += len(event.data.encode() if event.kind == "text" else event.data)
        self.assertEqual(code, 1008)
        self.assertLess(received, 3 * pmdaemon.WS_SEND_BUFFER)

    def test_a_client_that_stops_reading_does_not_hold_up_others(self):
        go = os.path.join(self.daemon.home, "go")
        self.daemon.start("ws-flood", PY, ["-c", flood_script(go)])
        stalled = self.connect(receive_buffer=65536)
        stalled.send_json({"type": "subscribe", "channel": "logs", "process": "ws-flood"})
        reader = self.connect()
        reader.send_json({"type": "ping"})
        reader.recv_message("pong")                 # both sessions are set up
        open(go, "w").close()                       # 3.5 MB of log lines for the stalled client
        wait_for_flood(self.daemon, "ws-flood")
        self.daemon.start("ws-after", "sleep", ["60"])
        reader.recv_message("process_event", match=lambda m: m["data"]["process"] == "ws-after")
        for _ in range(4):                          # 4 ticks of 0.2 s: past the 0.5 s grace
            reader.recv_message("system_update")
        # The stalled client is closed after the grace: what was queued, then 1008, never 3.5 MB.
        self.assertClosedAfterItsQueue(stalled)
        for name in ("ws-flood", "ws-after"):
            self.daemon.request("DELETE", "/api/processes/" + name)


class TestWsSessionBounds(unittest.TestCase):
    """A WsSession on a real socket pair, in-process, so what it holds can be looked at."""

    def test_pongs_count_against_the_send_buffer(self):
        import asyncio

        async def scenario():
            server_end, client_end = socket.socketpair()
            server_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            reader, writer = await asyncio.open_connection(sock=server_end)
            told = asyncio.Event()
            session = pmdaemon.WsSession(reader, writer, pmdaemon.WsProtocol(), lambda s, e: told.set(),
                                         send_buffer=65536, ping_interval=3600, slow_grace=3600)
            running = asyncio.ensure_future(session.run())
            client_end.setblocking(False)
            flood = client_frame(9, b"p" * 125) * 20000 + client_frame(1, b"done")   # 2.5 MB of pongs
            await asyncio.get_event_loop().sock_sendall(client_end, flood)        # never reading
            await asyncio.wait_for(told.wait(), 20)
            held = writer.transport.get_write_buffer_size()
            session.fail(1000)
            client_end.close()
            await asyncio.wait_for(running, 10)
            return held
        held = run_async(scenario())
        self.assertLessEqual(held, 65536 + 200)          # the bound, plus at most one frame


class TestWebSocketLagging(DaemonTestCase):
    daemon_args = ("--ws-slow-grace", "60")         # a lagging reader here is never closed

    def test_a_reader_that_falls_behind_is_told_how_many_lines_it_lost(self):
        go = os.path.join(self.daemon.home, "go-lag")
        self.daemon.start("ws-lag", PY, ["-c", flood_script(go)])
        lagging = self.ws(receive_buffer=65536)
        lagging.send_json({"type": "subscribe", "channel": "logs", "process": "ws-lag"})
        lagging.recv_message("subscribed")
        open(go, "w").close()
        wait_for_flood(self.daemon, "ws-lag")
        lines = 0                                   # now read everything: lines, then the report
        while True:
            message = lagging.recv_message()
            if message["type"] == "log":
                lines += 1
            elif message["type"] == "dropped":
                break
        self.assertGreater(message["data"]["log_lines"], 0)
        self.assertLess(lines, 16000)
        self.daemon.request("DELETE", "/api/processes/ws-lag")


class TestWebSocketKeepalive(DaemonTestCase):
    daemon_args = ("--ws-ping-interval", "0.15", "--ws-pong-timeout", "0.5", "--max-connections", "6")

    def test_server_pings_and_closes_a_silent_client(self):
        client = self.ws()
        while True:
            event = client.recv()
            if event.kind == "ping":
                break
        self.assertEqual(len(event.data), 4)
        self.assertEqual(client.recv_close(timeout=5), 1008)

    def test_a_client_that_answers_pings_stays(self):
        client = self.ws()
        pongs = 0
        deadline = time.monotonic() + 0.8                 # past the pong timeout: it would be closed
        while time.monotonic() < deadline:
            client.sock.settimeout(2)
            event = client.recv()
            self.assertNotEqual(event.kind, "close")
            if event.kind == "ping":
                client.send(10, event.data)
                pongs += 1
        self.assertGreaterEqual(pongs, 2)

    def test_connection_cap_answers_503(self):
        held = [socket.create_connection(("127.0.0.1", self.daemon.port)) for _ in range(6)]
        try:
            wait_until(lambda: status_of(self.daemon.raw(b"GET /api/system HTTP/1.1\r\nHost: localhost\r\n\r\n",
                                                         read_timeout=2)) == 503, message="503 at the cap")
        finally:
            for sock in held:
                sock.close()
        wait_until(lambda: self.daemon.get("/api/system")[0] == 200, message="service after the cap")


# -- in-process: one HttpConnection, and the answers learned from repeated heads ---------------

def read_one_response(sock, head_only=False):
    """One HTTP response from a blocking socket: its exact bytes (Content-Length framed, or
    until the server closes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"\r\nContent-Length: (\d+)", head)
    wanted = 0 if head_only or length is None else int(length.group(1))
    while len(body) < wanted:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


class TestHttpConnection(unittest.TestCase):
    """One connection's admission, loop, deadline and send(), over a real socket pair."""

    def on_connection(self, scenario):
        import asyncio
        home = tempfile.mkdtemp(prefix="pmd-conn-")
        self.addCleanup(shutil.rmtree, home, True)

        async def main():
            settings = pmdaemon.DaemonConfig(port=0, home=home, host="127.0.0.1")
            server = pmdaemon.HttpServer(pmdaemon.Api(pmdaemon.Supervisor(home), pmdaemon.AccessPolicy(None)),
                                         None, settings)
            ours, theirs = socket.socketpair()
            theirs.settimeout(5)
            reader, writer = await asyncio.open_connection(sock=ours)
            try:
                return await scenario(server, pmdaemon.HttpConnection(server, reader, writer), theirs)
            finally:
                writer.close()
                theirs.close()
                server.peer_users.close()
        return run_async(main())

    @staticmethod
    async def answers(writer_closed, client):
        """All the client receives until the connection is closed."""
        import asyncio
        writer_closed()
        await asyncio.sleep(0.05)                   # the transport closes on the next turn of the loop
        data = b""
        for chunk in iter(lambda: client.recv(65536), b""):
            data += chunk
        return data

    def test_admission_outcomes(self):
        head = pmdaemon.parse_head

        async def scenario(server, connection, client):
            self.assertIs(connection._admit(head(b"GET /api/processes HTTP/1.1\r\nHost: localhost")),
                          pmdaemon.NOTHING_RESERVED)
            for text, status in ((b"OPTIONS /api/processes HTTP/1.1\r\nHost: localhost", 204),
                                 (b"GET /nowhere HTTP/1.1\r\nHost: localhost", 404)):
                outcome = connection._admit(head(text))
                self.assertIsInstance(outcome, pmdaemon.AnsweredFromHead)
                self.assertEqual(outcome.response.status, status)
            post = head(b"POST /api/processes HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 10\r\nExpect: 100-continue")
            connection.admission = connection._admit(post)
            self.assertEqual((connection.admission, server.body_memory), (pmdaemon.Admitted(10), 10))
            self.assertEqual(client.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")
            connection._release_body_budget()
            self.assertEqual((connection.admission, server.body_memory), (None, 0))
            with self.assertRaises(pmdaemon.HttpError) as caught:       # a body is never read for a refusal
                connection._admit(head(b"POST /nowhere HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5"))
            self.assertEqual(caught.exception.status, 404)
        self.on_connection(scenario)

    def test_requests_in_order_then_nothing_held(self):
        async def scenario(server, connection, client):
            client.sendall(b"GET /api/system HTTP/1.1\r\nHost: localhost\r\n\r\n"
                           b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\n"
                           b"POST /api/processes/none/stop HTTP/1.1\r\nHost: localhost\r\n"
                           b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
            client.shutdown(socket.SHUT_WR)
            self.assertIsNone(await connection.run())
            self.assertEqual((server.body_memory, server.deadlines, connection.admission), (0, set(), None))
            data = await self.answers(connection.writer.close, client)
            self.assertEqual(re.findall(rb"HTTP/1.1 (\d+) ", data), [b"200", b"204", b"404"])
        self.on_connection(scenario)

    def test_a_late_request_is_told_408_when_its_deadline_passes(self):
        import asyncio

        async def scenario(server, connection, client):
            client.sendall(b"GET /api/system HTTP/1.1\r\nHo")
            running = asyncio.ensure_future(connection.run())
            await asyncio.sleep(0.05)
            self.assertEqual(connection.phase, pmdaemon.HEAD)
            connection.expire()
            self.assertIsNone(await running)
            data = await self.answers(lambda: None, client)
            self.assertTrue(data.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), data)
            self.assertIn(b"\r\nConnection: close\r\n", data)
        self.on_connection(scenario)


class TestRepeatedAnswers(unittest.TestCase):
    """The fast path for a head seen before answers exactly what the full path answers."""

    CORPUS = [
        b"GET /api/processes HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"GET /api/system HTTP/1.1\r\nHost: 127.0.0.1:9615\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n",
        b"HEAD /api/processes HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"GET /api/processes HTTP/1.0\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n",
        b"GET /api/processes HTTP/1.1\r\nHost: localhost\r\nOrigin: http://localhost:3000\r\n\r\n",
        b"\r\nGET /api/system HTTP/1.1\r\nhost: [::1]\r\n\r\n",
        b"GET http://localhost/api/processes HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"GET /api/processes HTTP/1.1\nHost: localhost\n\n",
        b"GET /api/processes HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
        b"GET /api/processes?status=online HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"GET /api/processes HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        b"GET /api/processes HTTP/1.0\r\nHost: localhost\r\n\r\n",
        b"GET /api/processes HTTP/1.1\r\nHost: evil.example\r\n\r\n",
        b"GET /api/processes HTTP/1.1\r\nHost: localhost\r\nOrigin: http://evil.example\r\n\r\n",
        b"GET /api/processes HTTP/1.1\r\nHost: localhost\r\nOrigin: http://a\r\nOrigin: http://b\r\n\r\n",
        b"GET /api/processes HTTP/1.1\r\nHost: localhost\r\nHost: other\r\n\r\n",
        b"GET /api/processes HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /api/processes/none HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"GET /api/processes/ HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"POST /api/system HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"GET /api/processes HTTP/1.1\r\nHost: localhost\r\nBad Header: x\r\n\r\n",
        b"GET /api/processes HTTP/2.0\r\nHost: localhost\r\n\r\n",
        b"OPTIONS /api/processes HTTP/1.1\r\nHost: localhost\r\nOrigin: http://localhost\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    ]
    LEARNED = {0, 1, 2, 3, 4, 5, 6, 7, 8}
    KEYED_CORPUS = [
        b"GET /api/processes HTTP/1.1\r\nHost: anything\r\nX-API-Key: the-key\r\n\r\n",
        b"GET /api/system HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer read-key\r\n\r\n",
        b"GET /api/processes HTTP/1.1\r\nHost: anything\r\nX-API-Key: the-kez\r\n\r\n",
        b"GET /api/processes HTTP/1.1\r\nHost: anything\r\n\r\n",
    ]

    def exchange(self, corpus, **config):
        """Each head twice on one connection (a new one when the first answer closed it):
        [(first answer, second answer)], and the heads the server learned."""
        import asyncio
        home = temp_dir(self, "pmd-fast-")

        async def scenario():
            supervisor = pmdaemon.Supervisor(home)
            settings = pmdaemon.DaemonConfig(port=0, home=home, host="127.0.0.1", **config)
            policy = pmdaemon.AccessPolicy(settings.api_key, cors_origins=("http://localhost:3000",),
                                           read_keys=settings.read_keys)
            server = pmdaemon.HttpServer(pmdaemon.Api(supervisor, policy), None, settings)
            port = await server.bind()
            await server.start_serving()
            loop = asyncio.get_event_loop()
            answers = await loop.run_in_executor(None, self.send_corpus, port, corpus)
            await server.close()
            return answers, set(server.repeated[False].plans)
        return run_async(scenario())

    @staticmethod
    def send_corpus(port, corpus):
        answers = []
        for head in corpus:
            head_only = head.startswith(b"HEAD")
            pair = []
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            for _ in range(2):
                sock.sendall(head)
                answer = read_one_response(sock, head_only)
                pair.append(answer)
                if b"\r\nConnection: close\r\n" in answer or not answer.startswith(b"HTTP/1.1 200"):
                    sock.close()
                    if len(pair) == 1:      # only for a second round: one unused meets a closing server
                        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.close()
            answers.append(pair)
        return answers

    def assertSameAnswers(self, corpus, answers):
        for head, (first, second) in zip(corpus, answers):
            self.assertTrue(first.startswith(b"HTTP/1.1 "), (head, first))
            self.assertEqual(re.sub(rb"Date: [^\r]+", b"", first), re.sub(rb"Date: [^\r]+", b"", second), head)

    def test_learned_heads_are_answered_as_the_full_path_answers(self):
        answers, learned = self.exchange(self.CORPUS)
        self.assertSameAnswers(self.CORPUS, answers)
        self.assertEqual(learned, {self.CORPUS[index] for index in self.LEARNED})
        by_head = dict(zip(self.CORPUS, answers))
        self.assertIn(b"\r\nAccess-Control-Allow-Origin: http://localhost:3000\r\nVary: Origin\r\n",
                      by_head[self.CORPUS[4]][1])
        self.assertTrue(by_head[self.CORPUS[2]][1].endswith(b"\r\n\r\n"))          # HEAD: no body
        self.assertIn(b"\r\nConnection: keep-alive\r\n", by_head[self.CORPUS[3]][1])
        self.assertTrue(by_head[self.CORPUS[12]][1].startswith(b"HTTP/1.1 403"))

    def test_with_keys_only_admitted_heads_are_learned(self):
        answers, learned = self.exchange(self.KEYED_CORPUS, api_key="the-key", read_keys=("read-key",))
        self.assertSameAnswers(self.KEYED_CORPUS, answers)
        self.assertEqual(learned, set(self.KEYED_CORPUS[:2]))
        self.assertEqual([status_of(pair[1]) for pair in answers], [200, 200, 401, 401])

    def test_bounded_and_oldest_forgotten(self):
        answers = pmdaemon.RepeatedAnswers(limit=2, max_head=60)
        heads = [b"GET /api/system HTTP/1.1\r\nHost: localhost:%d\r\n\r\n" % port for port in (1, 2, 3)]
        for head in heads + [b"GET /api/system HTTP/1.1\r\nHost: localhost\r\nX-Padding: %s\r\n\r\n" % b"x" * 40]:
            request = parse_all(head)[0][0]
            request.route = pmdaemon.Route("GET", None, None, snapshot=lambda: b"{}")
            answers.learn(head, request, pmdaemon.Response(200, b"{}"), keep_alive=True)
        self.assertEqual(list(answers.plans), heads[1:])
        self.assertIsNone(answers.answer(heads[0], b"date"))
        self.assertTrue(answers.answer(heads[2], b"date").endswith(b"\r\n\r\n{}"))
        big = b"[%s]" % b",".join([b"1"] * 40000)                 # past what a plan keeps: rendered each time
        request = parse_all(heads[0])[0][0]
        request.route = pmdaemon.Route("GET", None, None, snapshot=lambda: big)
        answers.learn(heads[0], request, pmdaemon.Response(200, big), keep_alive=True)
        for _ in range(2):
            self.assertEqual(answers.answer(heads[0], b"date"), pmdaemon.serialize_response(
                pmdaemon.Response(200, big), b"date", True))


# ----------------------------------------------------------------------------------------------
# 11. CLI
# ----------------------------------------------------------------------------------------------

# -- the verbs, `web` and the terminal, against a live daemon ----------------------------------

class TestCli(DaemonTestCase):
    """Every verb against a real daemon in a temp home, through its Unix socket."""

    def run_cli(self, *args, env=None, timeout=30):
        environ = dict(os.environ, PMDAEMON_HOME=self.daemon.home)
        environ.pop("PMDAEMON_URL", None)
        environ.update(env or {})
        return subprocess.run([PY, PMDAEMON] + list(args), **CAPTURE, universal_newlines=True, timeout=timeout,
                              env=environ)

    def cli(self, *args):
        """(exit status, stdout) of the CLI, run in this process (what a subprocess would do,
        without an interpreter start per call); stderr must hold no traceback."""
        import io
        out, err = io.StringIO(), io.StringIO()
        saved = {name: os.environ.get(name) for name in ("PMDAEMON_HOME", "PMDAEMON_URL")}
        os.environ["PMDAEMON_HOME"] = self.daemon.home
        os.environ.pop("PMDAEMON_URL", None)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = pmdaemon.main(list(args))
                except SystemExit as exit:          # argparse's usage errors
                    code = exit.code
        finally:
            for name, value in saved.items():
                os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
        self.assertNotIn("Traceback", err.getvalue())
        self.last_stderr = err.getvalue()
        return code, out.getvalue()

    def table(self):
        lines = self.cli("ls")[1].splitlines()
        return {line.split()[1]: line.split() for line in lines[1:]}

    def test_start_ls_logs_stop_delete(self):
        code, out = self.cli("start", "--port", "3801", "--name", "cli-a", PY, "--", "-c",
                             "print('hello from cli'); import time; time.sleep(60)")
        self.assertEqual((code, out), (0, "Process 'cli-a' started successfully\n"))
        header = self.cli("ls")[1].splitlines()[0]
        self.assertEqual(header.split(), ["id", "name", "status", "pid", "port", "cpu", "mem", "uptime",
                                          "restarts", "health"])
        row = self.table()["cli-a"]
        self.assertEqual((row[2], row[4], row[9]), ("online", "3801", "none"))
        self.assertNotIn("\x1b[", self.cli("ls")[1])                      # no colour into a pipe
        wait_until(lambda: "hello from cli" in self.cli("logs", "cli-a")[1], message="the line via the CLI")
        self.assertEqual(self.cli("stop", "cli-a"), (0, "cli-a: stopped\n"))
        self.assertEqual(self.table()["cli-a"][2], "stopped")
        self.assertEqual(self.cli("start", "cli-a"), (0, "cli-a: started\n"))   # an existing name starts it
        self.assertEqual(self.cli("start", "cli-a"), (0, "cli-a: already running\n"))
        self.assertEqual(self.cli("delete", "cli-a"), (0, "cli-a: deleted\n"))
        result = self.run_cli("info", "cli-a")
        self.assertEqual((result.returncode, result.stdout), (1, ""))
        self.assertEqual(result.stderr, "pmdaemon: Process 'cli-a' not found (PROCESS_NOT_FOUND)\n")

    def test_global_options_go_before_or_after_the_verb(self):
        url = "http://127.0.0.1:%d" % self.daemon.port
        for argv in (["--url", url, "ls", "--json"], ["ls", "--url", url, "--json"], ["--json", "ls"]):
            code, out = self.cli(*argv)
            self.assertEqual((code, "processes" in json.loads(out)), (0, True), argv)

    def test_usage_errors_and_a_closed_pipe_are_quiet(self):
        result = self.run_cli("start", "-e", "FOO", "x")
        self.assertEqual((result.returncode, result.stderr), (2, "pmdaemon: -e/--env needs KEY=VALUE, got 'FOO'\n"))
        self.assertEqual(self.run_cli("scale", "x", "many").returncode, 2)
        pipe = subprocess.run("%s %s ls --json | head -c 1" % (shlex.quote(PY), shlex.quote(PMDAEMON)), shell=True,
                              **CAPTURE, universal_newlines=True, env=dict(os.environ, PMDAEMON_HOME=self.daemon.home))
        self.assertEqual((pipe.stdout, pipe.stderr), ("{", ""))

    def test_a_script_file_runs_through_its_interpreter(self):
        script = os.path.join(self.daemon.home, "hello.py")
        with open(script, "w") as handle:
            handle.write("import sys, time\nprint('args', sys.argv[1:], flush=True)\ntime.sleep(60)\n")
        code, out = self.cli("start", script, "--", "--flag", "x")
        self.assertEqual(code, 0)
        self.assertEqual(out.splitlines(), ["hello: running %s with %s" % (script, sys.executable),
                                            "Process 'hello' started successfully"])
        wait_until(lambda: self.daemon.last_line("hello") == "args ['--flag', 'x']", message="the script's line")
        code, out = self.cli("start", script, "-e", "A=1")          # the same name, new settings
        self.assertEqual((code, self.daemon.process("hello")["config"]["env"]), (0, {"A": "1"}))
        self.cli("delete", "hello")

    def test_scale_and_actions_on_all(self):
        self.cli("start", "sleep", "--name", "cli-g", "-i", "2", "--", "60")
        self.cli("start", "sleep", "--name", "cli-s", "--", "60")
        self.assertEqual(self.cli("scale", "cli-g", "3"), (0, "Process 'cli-g' scaled\n"))
        self.assertEqual(sorted(name for name in self.table() if name.startswith("cli-g")),
                         ["cli-g-0", "cli-g-1", "cli-g-2"])
        self.assertEqual(self.cli("reload", "cli-g"), (0, "cli-g: reloaded\n"))
        self.assertEqual(self.cli("restart", "cli-s"), (0, "cli-s: restarted\n"))
        self.assertEqual(self.daemon.process("cli-s")["restarts"], 1)
        code, out = self.cli("stop", "all")
        self.assertEqual(code, 0)
        self.assertEqual(sorted(out.splitlines()), ["cli-g-0: stopped", "cli-g-1: stopped", "cli-g-2: stopped",
                                                    "cli-s: stopped"])
        self.assertEqual({row[2] for row in self.table().values()}, {"stopped"})
        self.assertEqual(self.cli("delete", "all")[0], 0)
        self.assertEqual(self.table(), {})

    def test_stop_waits_for_a_slow_stop_past_the_quick_timeout(self):
        trap = "trap '' TERM; while true; do sleep 0.05; done"
        self.daemon.start("cli-slow", "sh", ["-c", trap], kill_timeout=1500)
        started = time.monotonic()
        self.assertEqual(self.cli("--timeout", "0.3", "stop", "cli-slow"), (0, "cli-slow: stopped\n"))
        self.assertGreaterEqual(time.monotonic() - started, 1.5)
        self.cli("delete", "cli-slow")

    def test_logs_of_all_name_their_process_and_pick_a_stream(self):
        self.daemon.start("cli-l1", "sh", ["-c", "echo one; echo oops >&2; exec sleep 60"])
        self.daemon.start("cli-l2", "sh", ["-c", "echo two; exec sleep 60"])
        wait_until(lambda: "cli-l2 | " in self.cli("logs")[1] and "cli-l1 | " in self.cli("logs")[1],
                   message="lines of both")
        lines = self.cli("logs")[1].splitlines()
        self.assertTrue(any(line.startswith("cli-l1 | ") and line.endswith(" stdout one") for line in lines), lines)
        self.assertTrue(any(line.startswith("cli-l2 | ") and line.endswith(" stdout two") for line in lines), lines)
        errors = self.cli("logs", "cli-l1", "--err")[1].splitlines()
        self.assertEqual([line.split(" ", 2)[1:] for line in errors], [["stderr", "oops"]])
        self.assertEqual(self.cli("flush", "cli-l1"), (0, "cli-l1: logs flushed\n"))
        self.assertEqual(self.cli("logs", "cli-l1")[1], "")
        for name in ("cli-l1", "cli-l2"):
            self.cli("delete", name)

    def test_logs_follow_streams_new_lines(self):
        go = os.path.join(self.daemon.home, "follow-go")
        self.daemon.start("cli-f", PY, ["-c", "import os, time\nprint('before', flush=True)\n"
                                        "while not os.path.exists(%r): time.sleep(0.01)\n"
                                        "print('after', flush=True)\ntime.sleep(60)" % go])
        wait_until(lambda: self.daemon.last_line("cli-f") == "before", message="the first line")
        environ = dict(os.environ, PMDAEMON_HOME=self.daemon.home)
        with subprocess.Popen([PY, PMDAEMON, "logs", "cli-f", "--follow", "--lines", "5"], stdout=subprocess.PIPE,
                              env=environ, universal_newlines=True) as follower:
            self.assertTrue(follower.stdout.readline().endswith(" stdout before\n"))
            open(go, "w").close()
            self.assertTrue(follower.stdout.readline().endswith(" stdout after\n"))
            follower.terminate()
        self.cli("delete", "cli-f")

    def test_info_and_system_are_readable_text(self):
        self.daemon.start("cli-i", "sleep", ["60"], port=3807)
        fields = dict(line.split(None, 1) for line in self.cli("info", "cli-i")[1].splitlines() if " " in line)
        self.assertEqual((fields["status"], fields["port"], fields["command"], fields["restarts"]),
                         ("online", "3807", "sleep 60", "0"))
        self.assertEqual(json.loads(self.cli("info", "cli-i", "--json")[1])["name"], "cli-i")
        system = self.cli("system")[1]
        self.assertRegex(system, r"cpu +[0-9.]+% of [0-9]+ cores")
        self.assertRegex(system, r"load +[0-9.]+ [0-9.]+ [0-9.]+")
        self.cli("delete", "cli-i")

    def test_apply_is_declarative(self):
        path = os.path.join(self.daemon.home, "apps.json")

        def write(apps):
            with open(path, "w") as handle:
                json.dump({"apps": apps}, handle)
        write([{"name": "file-a", "script": "sleep", "args": "60", "env": {"N": 5, "FLAG": True},
                "env_production": {"MODE": "prod"}, "max_memory_restart": "1.5G"},
               {"name": "file-b", "script": "sleep", "args": ["60"], "instances": 2},
               {"name": "file-c", "script": "sleep", "args": ["60"], "colour": "red"}])
        code, out = self.cli("apply", path, "--env", "production")
        self.assertEqual((code, out.splitlines()), (0, ["warning: file-c: colour skipped: not a PM2 or pmdaemon setting",
                                                        "file-a: created", "file-b: created", "file-c: created"]))
        config = self.daemon.process("file-a")["config"]
        self.assertEqual((config["env"], config["args"], config["max_memory_restart"], config["origin"]),
                         ({"N": "5", "FLAG": "true", "MODE": "prod"}, ["60"], 3 * 1024 ** 3 // 2, "file:" + path))
        write([{"name": "file-a", "script": "sleep", "args": ["60"], "env": {"N": "5", "FLAG": "true", "MODE": "prod"},
                "max_memory_restart": "1.5G"},
               {"name": "file-b", "script": "sleep", "args": ["61"], "instances": 2}])
        code, out = self.cli("apply", path, "--prune")
        self.assertEqual(out.splitlines(), ["file-a: unchanged", "file-b: updated (restarted)",
                                            "file-c: deleted (created by %s, no longer in it)" % path])
        self.cli("start", "sleep", "--name", "file-extra", "--", "60")      # not the file's: --prune keeps it
        code, out = self.cli("apply", path, "--prune")
        self.assertEqual((code, out.splitlines()), (0, ["file-a: unchanged", "file-b: unchanged"]))
        self.assertEqual(sorted(self.table()), ["file-a", "file-b-0", "file-b-1", "file-extra"])
        self.cli("delete", "all")

    def test_save_and_resurrect_restore_exactly(self):
        self.cli("delete", "all")
        self.cli("start", "sleep", "--name", "keep-on", "-e", "X=1", "--", "60")
        self.cli("start", "sleep", "--name", "keep-off", "--", "60")
        self.cli("stop", "keep-off")
        code, out = self.cli("save")
        self.assertEqual((code, out), (0, "saved 2 process(es) to %s\n" % os.path.join(self.daemon.home, "dump.json")))
        self.assertEqual(oct(os.stat(os.path.join(self.daemon.home, "dump.json")).st_mode & 0o777), "0o600")
        self.cli("delete", "all")
        code, out = self.cli("resurrect")
        self.assertEqual((code, out.splitlines()), (0, ["keep-on: created", "keep-off: created (not started)"]))
        rows = self.table()
        self.assertEqual((rows["keep-on"][2], rows["keep-off"][2]), ("online", "stopped"))
        self.assertEqual(self.daemon.process("keep-on")["config"]["env"], {"X": "1"})
        self.cli("delete", "all")

    def test_startup_describes_a_unit_for_systemd_or_a_crontab_line(self):
        unit = pmdaemon.systemd_unit("/srv/pmd", "app")
        for line in ("Type=notify", "Restart=on-failure", "KillMode=process", "User=app", "WatchdogSec=30",
                     "Environment=PMDAEMON_HOME=/srv/pmd", "WantedBy=multi-user.target"):
            self.assertIn("\n%s\n" % line, unit)
        self.assertIn("ExecStart=%s %s web --home /srv/pmd --quiet\n" % (sys.executable, PMDAEMON), unit)
        code, out = self.cli("startup")
        if os.path.isdir("/run/systemd/system"):
            self.assertEqual(code, 0)
            self.assertIn("Type=notify", out)
        else:
            self.assertEqual(code, 0)
            self.assertIn("does not run systemd", out)
            self.assertIn("@reboot %s %s web --home %s --daemonize" % (PY, PMDAEMON, self.daemon.home), out)

    def test_start_and_restart_exit_1_when_the_program_cannot_start(self):
        script = write_script(os.path.join(self.daemon.home, "cli-app.sh"), "exec sleep 60")
        self.assertEqual(self.cli("start", script, "--name", "cli-x")[0], 0)
        os.chmod(script, 0o644)
        result = self.run_cli("restart", "cli-x")
        self.assertEqual(result.returncode, 1)
        self.assertIn("could not start", result.stderr)
        result = self.run_cli("start", "/nonexistent/prog", "--name", "cli-y")     # created, but it cannot run
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr, "pmdaemon: Process 'cli-y' created but failed to start: script "
                         "'/nonexistent/prog' does not exist\n")
        for name in ("cli-x", "cli-y"):
            self.cli("delete", name)

    def test_logs_on_a_terminal_show_control_sequences_instead_of_obeying_them(self):
        self.daemon.start("cli-esc", PY, ["-c", r"print('\x1b[2J\x1b]0;owned\x07red\rX'); import time; time.sleep(60)"])
        wait_until(lambda: "red" in self.daemon.last_line("cli-esc"), message="the line")
        output = run_in_terminal([PY, PMDAEMON, "logs", "cli-esc"], dict(os.environ, PMDAEMON_HOME=self.daemon.home))
        self.assertIn(b"\\x1b[2J\\x1b]0;owned\\x07red\\rX", output)
        self.assertNotIn(b"\x1b", output)
        self.assertIn("\x1b[2J\x1b]0;owned\x07red", self.cli("logs", "cli-esc")[1])    # to a pipe: as it is
        self.cli("delete", "cli-esc")

    def test_monit_shows_processes_and_its_keys_act(self):
        self.cli("delete", "all")                      # mon-a is the first, so the selected one
        self.daemon.start("mon-a", "sh", ["-c", "echo monit-line; exec sleep 60"])
        wait_until(lambda: self.daemon.last_line("mon-a") == "monit-line", message="the line")
        screen = Terminal([PY, PMDAEMON, "monit"], dict(os.environ, PMDAEMON_HOME=self.daemon.home, TERM="xterm"))
        self.addCleanup(screen.close)
        screen.wait_for(b"mon-a")
        screen.wait_for(b"monit-line")                 # the selected process's log
        screen.send(b"s")                             # stop the selected process
        wait_until(lambda: self.daemon.process("mon-a")["status"] == "stopped", message="the stop")
        screen.wait_for(b"stopped")
        screen.resize(30, 100)
        screen.send(b"q")
        self.assertEqual(screen.wait_exit(), 0)
        self.assertIn(b"\x1b[?1049l", screen.output)  # the terminal is restored
        self.cli("delete", "mon-a")


def run_in_terminal(argv, environ):
    """Everything a command writes to a pseudo-terminal, until it exits."""
    screen = Terminal(argv, environ)
    screen.wait_exit()
    screen.close()
    return screen.output


class Terminal:
    """A command on a pseudo-terminal (stdlib pty): keys in, the raw screen output kept."""

    def __init__(self, argv, environ, rows=24, columns=80):
        import pty
        self.leader, follower = pty.openpty()
        self.resize(rows, columns)
        self.proc = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower, env=environ,
                                     start_new_session=True)
        os.close(follower)
        self.output = b""

    def resize(self, rows, columns):
        import fcntl
        import termios
        fcntl.ioctl(self.leader, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        if getattr(self, "proc", None) is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGWINCH)

    def read(self, timeout):
        import select as select_module
        readable, _, _ = select_module.select([self.leader], [], [], timeout)
        if readable:
            with contextlib.suppress(OSError):
                self.output += os.read(self.leader, 65536)

    def wait_for(self, text, timeout=10):
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if time.monotonic() > deadline:
                raise AssertionError("%r never appeared on the terminal: %r" % (text, self.output[-400:]))
            self.read(0.1)

    def send(self, keys):
        os.write(self.leader, keys)

    def wait_exit(self, timeout=10):
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.read(0.05)
        self.read(0.05)
        return self.proc.wait(timeout=1)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(OSError):
            os.close(self.leader)


class TestCliDaemon(unittest.TestCase):
    """The CLI starts a daemon when none runs; web --daemonize; sd_notify."""

    def setUp(self):
        self.home = temp_dir(self, "pmd-cli-")
        code_cache_for(self.home)                   # each daemon compiles once, not twice
        self.addCleanup(self.stop_daemon)

    def stop_daemon(self):
        pid = read_text(os.path.join(self.home, "pmdaemon.lock")).strip()
        if pid.isdigit() and pid_alive(int(pid)):
            os.kill(int(pid), signal.SIGTERM)
            wait_until(lambda: not pid_alive(int(pid)), message="the daemon to stop")

    def run_cli(self, *args):
        environ = dict(os.environ, PMDAEMON_HOME=self.home, PMDAEMON_PORT="0")
        environ.pop("PMDAEMON_URL", None)
        return subprocess.run([PY, PMDAEMON] + list(args), **CAPTURE, universal_newlines=True, timeout=30, env=environ)

    def test_a_command_starts_a_daemon_when_none_runs(self):
        result = self.run_cli("ls", "--no-daemon")
        self.assertEqual(result.returncode, 1)
        self.assertIn("cannot reach the daemon", result.stderr)
        result = self.run_cli("ls")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stderr, r"^pmdaemon: started a daemon in the background \(pid [0-9]+, home %s\)\n$"
                         % re.escape(self.home))
        pid = int(read_text(os.path.join(self.home, "pmdaemon.lock")))
        self.assertNotEqual(os.getsid(pid), os.getsid(0))   # its own session: a closed terminal is no harm
        again = self.run_cli("ls")
        self.assertEqual((again.returncode, again.stderr), (0, ""))      # the same daemon, not a second one
        self.assertEqual(int(read_text(os.path.join(self.home, "pmdaemon.lock"))), pid)

    def test_web_daemonize(self):
        result = self.run_cli("web", "--daemonize")
        self.assertEqual(result.returncode, 0, result.stderr)
        pid = int(re.findall(r"pid ([0-9]+)", result.stdout)[0])
        self.assertTrue(pid_alive(pid))
        self.assertEqual(self.run_cli("system", "--json").returncode, 0)
        result = self.run_cli("web", "--daemonize")     # the lock is honoured
        self.assertEqual(int(re.findall(r"pid ([0-9]+)", result.stdout)[0]), pid)

    def test_the_options_belong_to_the_home(self):
        with socket.socket() as probe:              # a port that was free a moment ago
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        result = self.run_cli("web", "--daemonize", "--port", str(port), "--sample-interval", "0.5")
        self.assertEqual(result.returncode, 0, result.stderr)
        first = int(re.findall(r"pid ([0-9]+)", result.stdout)[0])
        created = self.run_cli("start", "sleep", "--name", "kept", "--", "60")
        self.assertEqual(created.returncode, 0, created.stderr)
        os.kill(first, signal.SIGKILL)                      # the daemon dies; the next command brings it back
        wait_until(lambda: not pid_alive(first), message="the daemon gone")
        result = self.run_cli("ls")
        self.assertEqual(result.returncode, 0, result.stderr)
        second = int(read_text(os.path.join(self.home, "pmdaemon.lock")))
        with open("/proc/%d/cmdline" % second, "rb") as handle:
            argv = handle.read().split(b"\0")
        self.assertEqual(argv[argv.index(b"--port") + 1], str(port).encode())     # not the default 9615
        self.assertEqual(argv[argv.index(b"--sample-interval") + 1], b"0.5")
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        self.assertIn("--port %d" % port, self.run_cli("startup").stdout)    # a unit, or a crontab line
        unit = pmdaemon.systemd_unit(self.home, "root")
        self.assertIn("--port %d" % port, unit)
        self.assertIn("\nDelegate=yes\n", unit)

    def test_kill_stops_the_daemon_and_its_processes(self):
        created = self.run_cli("start", "sleep", "--name", "kept", "--", "60")
        self.assertEqual(created.returncode, 0, created.stderr)
        daemon = int(read_text(os.path.join(self.home, "pmdaemon.lock")))
        kept = [line for line in self.run_cli("ls").stdout.splitlines() if " kept " in line]
        child = int(kept[0].split()[3])
        result = self.run_cli("kill")
        self.assertEqual((result.returncode, result.stdout), (0, "stopped the daemon (pid %d) and its processes\n" % daemon))
        self.assertFalse(pid_alive(daemon))
        self.assertFalse(pid_alive(child))
        self.assertEqual(self.run_cli("kill").stdout, "no daemon is running for %s\n" % self.home)

    def test_sd_notify_ready_watchdog_stopping(self):
        path = os.path.join(self.home, "notify.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(path)
        listener.settimeout(10)
        self.addCleanup(listener.close)
        daemon = Daemon(home=os.path.join(self.home, "d"), env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
        self.addCleanup(daemon.cleanup)
        ready = listener.recv(4096).decode()
        self.assertIn("READY=1\n", ready)
        self.assertIn("MAINPID=%d" % daemon.proc.pid, ready)
        self.assertEqual(listener.recv(4096), b"WATCHDOG=1")
        daemon.proc.send_signal(signal.SIGTERM)
        while True:
            said = listener.recv(4096).decode()
            if said != "WATCHDOG=1":
                break
        self.assertTrue(said.startswith("STOPPING=1\n"), said)
        self.assertEqual(daemon.terminate(), 0)


# -- reading PM2 and supervisord files ---------------------------------------------------------

class TestStripJsonExtras(unittest.TestCase):
    """JSON as people write it: comments and trailing commas, strings untouched."""

    def test_comments_and_trailing_commas(self):
        text = '{\n // a comment\n "apps": [ /* one */ {"name": "a", "script": "x // not a comment", },\n ],\n}'
        self.assertEqual(pmdaemon.read_json_text(text), {"apps": [{"name": "a", "script": "x // not a comment"}]})

    def test_a_string_with_escaped_quote_and_comma(self):
        self.assertEqual(pmdaemon.read_json_text('["a\\",]", ]'), ['a",]'])

    def test_an_error_names_the_line(self):
        with self.assertRaisesRegex(pmdaemon.ConfigFileError, "line 3"):
            pmdaemon.read_json_text('{\n/* x\n*/ "a": }')


class TestReadYaml(unittest.TestCase):
    """PM2's YAML: block maps and lists, scalars, flow collections, block scalars."""

    def test_a_pm2_file(self):
        text = ("# ecosystem\napps:\n  - name: api   # the api\n    script: ./app.js\n    instances: 4\n"
                "    env:\n      PORT: 3000\n      DEBUG: 'false'\n      EMPTY: ''\n    args: [\"--a\", b, 3]\n"
                "    watch:\n    - src\n    - lib\n  - script: worker.py\n    autorestart: no\n"
                "    note: |\n      two\n      lines\n    folded: >-\n      one\n      line\n")
        self.assertEqual(pmdaemon.read_yaml(text), {"apps": [
            {"name": "api", "script": "./app.js", "instances": 4, "env": {"PORT": 3000, "DEBUG": "false", "EMPTY": ""},
             "args": ["--a", "b", 3], "watch": ["src", "lib"]},
            {"script": "worker.py", "autorestart": False, "note": "two\nlines\n", "folded": "one line"}]})

    def test_scalars(self):
        self.assertEqual(pmdaemon.read_yaml("a: ~\nb: 1.5\nc: \"x\\ty\"\nd: 'it''s'\ne: http://h:1/p\nf: {k: v, n: 2}\n"),
                         {"a": None, "b": 1.5, "c": "x\ty", "d": "it's", "e": "http://h:1/p", "f": {"k": "v", "n": 2}})

    def test_document_markers_and_a_top_level_list(self):
        self.assertEqual(pmdaemon.read_yaml("---\n- name: a\n  script: b\n...\n"), [{"name": "a", "script": "b"}])

    def test_errors_name_the_line(self):
        with self.assertRaisesRegex(pmdaemon.ConfigFileError, "line 2: a tab"):
            pmdaemon.read_yaml("apps:\n\t- a\n")
        with self.assertRaisesRegex(pmdaemon.ConfigFileError, "line 3: unexpected"):
            pmdaemon.read_yaml("a:\n    b: 1\n  c: 2\n")


class TestReadJsLiteral(unittest.TestCase):
    """Ecosystem .js files without node: literals are read, anything computed is named with its line."""

    def test_module_exports_literal(self):
        text = ("'use strict';\n// apps\nmodule.exports = {\n  apps : [{\n    name   : \"app1\",\n"
                "    script : './app.js', // x\n    env: {NODE_ENV: `dev`, N: 5, F: 1.5, G: -2,},\n"
                "    instances: 0x2, args: ['b\\'c'], watch: false, x: undefined,\n  }],\n};\n")
        self.assertEqual(pmdaemon.read_js_literal(text), {"apps": [
            {"name": "app1", "script": "./app.js", "env": {"NODE_ENV": "dev", "N": 5, "F": 1.5, "G": -2},
             "instances": 2, "args": ["b'c"], "watch": False, "x": None}]})

    def test_export_forms(self):
        app = {"name": "x", "script": "y"}
        for text in ('export default { apps: [{ name: "x", script: "y" }] }',
                     'export const apps = [{ name: "x", script: "y" }];',
                     'const config = { apps: [{ name: "x", script: "y" }] };\nmodule.exports = config;\n'):
            self.assertEqual(pmdaemon.read_js_literal(text), {"apps": [app]}, text)

    def test_without_node_a_js_file_is_read_as_a_literal(self):
        directory = tempfile.mkdtemp(prefix="pmd-nonode-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "ecosystem.config.js")
        saved = os.environ["PATH"]
        os.environ["PATH"] = directory                  # no node here
        self.addCleanup(os.environ.__setitem__, "PATH", saved)
        with open(path, "w") as handle:
            handle.write("module.exports = { apps: [{ name: 'lit', script: 'x.js' }] };\n")
        self.assertEqual(pmdaemon.load_apps_file(path).apps[0]["name"], "lit")
        with open(path, "w") as handle:
            handle.write("module.exports = {\n apps: [{ name: 'lit', script: 'x.js', cwd: __dirname }] };\n")
        with self.assertRaisesRegex(pmdaemon.ConfigFileError, "^line 2: __dirname is computed"):
            pmdaemon.load_apps_file(path)

    def test_computed_constructs_are_named_with_their_line(self):
        cases = {"{ apps: [{ env: { ...process.env } }] }": "line 1: spread (...)",
                 "{ apps: [{ cwd: __dirname }] }": "line 1: __dirname",
                 "{\n apps: [{ cwd: path.join(__dirname, 'a') }] }": "line 2: path.join()",
                 "{ apps: [{ name: `a${b}` }] }": "line 1: a template literal with ${}",
                 "{ apps: [{ PORT: process.env.PORT || 3000 }] }": "line 1: process.env",
                 "{ apps: ['a', 'b'].map(name => ({ name })) }": "line 1: .map()",
                 "{ apps: require('./apps.json') }": "line 1: require()"}
        for body, said in cases.items():
            with self.assertRaises(pmdaemon.ConfigFileError) as caught:
                pmdaemon.read_js_literal("module.exports = " + body)
            self.assertTrue(str(caught.exception).startswith(said), (body, str(caught.exception)))
            self.assertIn("without node only literals can be read", str(caught.exception))


@unittest.skipUnless(shutil.which("node"), "node is not on PATH")
class TestReadJsFile(unittest.TestCase):
    """With node on PATH, .js/.cjs/.mjs files are evaluated by node: computed configs work."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="pmd-js-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def read(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, "w") as handle:
            handle.write(text)
        return pmdaemon.load_apps_file(path)

    def test_an_ecosystem_compiled_from_typescript(self):
        self.assertEqual(pmdaemon.pm2_apps({"__esModule": True, "default": {"apps": [{"name": "api", "script": "a.js"}]}}),
                         [{"name": "api", "script": "a.js"}])
        if not shutil.which("node"):
            self.skipTest("node is not installed")
        loaded = self.read("ecosystem.config.js", '"use strict";\nObject.defineProperty(exports, "__esModule", '
                           '{ value: true });\nexports.default = {\n    apps: [{ name: "api", script: "app.js" }],\n};\n')
        self.assertEqual([app["name"] for app in loaded.apps], ["api"])

    def test_commonjs_that_computes(self):
        loaded = self.read("ecosystem.config.js", "const path = require('path');\nmodule.exports = { apps: "
                           "['a', 'b'].map((n) => ({ name: `w-${n}`, script: 'w.js', cwd: path.join(__dirname, n), "
                           "env: { ...{ X: 1 } } })) };\n")
        self.assertEqual([(app["name"], app["cwd"], app["env"], app["interpreter"]) for app in loaded.apps],
                         [("w-a", os.path.join(self.dir, "a"), {"X": "1"}, "node"),
                          ("w-b", os.path.join(self.dir, "b"), {"X": "1"}, "node")])

    def test_esm_mjs_and_cjs(self):
        self.assertEqual(self.read("ecosystem.config.mjs", "export default { apps: [{ name: 'm', script: 'm' }] };\n")
                         .apps[0]["name"], "m")
        self.assertEqual(self.read("x.cjs", "exports.apps = [{ name: 'c', script: 'c' }];\n").apps[0]["name"], "c")

    def test_export_default_in_a_js_file_falls_back_to_the_literal_reader(self):
        self.assertEqual(self.read("pm2.config.js", "export default { apps: [{ name: 'e', script: 'e' }] }\n")
                         .apps[0]["name"], "e")

    def test_a_missing_package_is_a_stub_in_a_dry_run_only(self):
        text = "require('pmd-not-installed').config();\nmodule.exports = { apps: [{ name: 's', script: 's' }] };\n"
        path = os.path.join(self.dir, "stub.config.js")
        with open(path, "w") as handle:
            handle.write(text)
        loaded = pmdaemon.load_apps_file(path, stub_missing=True)
        self.assertEqual((loaded.apps[0]["name"], loaded.warnings), ("s", [
            "module 'pmd-not-installed' is not installed here: a stub stood in for it, so what it computes is "
            "missing (install the project's packages for the real values)"]))
        with self.assertRaisesRegex(pmdaemon.ConfigFileError, "Cannot find module 'pmd-not-installed'"):
            pmdaemon.load_apps_file(path)

    def test_node_errors_are_reported(self):
        with self.assertRaisesRegex(pmdaemon.ConfigFileError, "node could not load it: .*nope"):
            self.read("bad.config.js", "throw new Error('nope ' + 1);\n")


class TestReadSupervisord(unittest.TestCase):
    """supervisord INI: interpolation, numprocs, groups, includes, priority, noted sections."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="pmd-ini-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def read(self, text, environ=None):
        path = os.path.join(self.dir, "supervisord.conf")
        return pmdaemon.read_supervisord(text, path, environ or {"USER": "app"}, pmdaemon.read_include, "file:" + path)

    def test_program_keys(self):
        apps, warnings = self.read(
            "[program:web]\ncommand=/usr/bin/python3 -m http.server %(process_num)d ; a comment\n"
            "process_name=%(program_name)s_%(process_num)02d\nnumprocs=2\nnumprocs_start=8000\ndirectory=%(here)s\n"
            "autostart=false\nautorestart=true\nstartsecs=5\nstartretries=7\nstopwaitsecs=10\nstopsignal=INT\n"
            "user=%(ENV_USER)s\nredirect_stderr=true\nstdout_logfile=/var/log/web-%(process_num)s.log\n"
            "stdout_logfile_maxbytes=50MB\nstdout_logfile_backups=10\numask=022\n"
            "environment=A=\"1,2\",B=x,C='%(program_name)s'\npriority=10\n")
        self.assertEqual(warnings, [])
        self.assertEqual([app["name"] for app in apps], ["web_8000", "web_8001"])
        self.assertEqual(apps[1], {
            "name": "web_8001", "script": "/usr/bin/python3", "args": ["-m", "http.server", "8001"], "cwd": self.dir,
            "autostart": False, "autorestart": True, "min_uptime": 5000, "max_restarts": 7, "kill_timeout": 10000,
            "kill_signal": "INT", "user": "app", "merge_logs": True, "out_file": "/var/log/web-8001.log",
            "log_max_size": 50 * 1024 ** 2, "log_max_files": 10, "umask": "022", "env": {"A": "1,2", "B": "x", "C": "web"},
            "origin": "file:" + os.path.join(self.dir, "supervisord.conf")})
        self.assertEqual(pmdaemon.validate_app(apps[1])[1], [])

    def test_unexpected_exits_groups_priority_and_sections(self):
        apps, warnings = self.read(
            "[unix_http_server]\nfile=/tmp/s.sock\n[supervisord]\nlogfile=/tmp/x\n[rpcinterface:supervisor]\n"
            "supervisor.rpcinterface_factory = x\n[program:late]\ncommand=sleep 1\n"
            "[program:early]\ncommand=sleep 2\npriority=1\nexitcodes=0,2\nkillasgroup=false\nstdout_syslog=true\n"
            "[group:backend]\nprograms=late,early\n[eventlistener:memmon]\ncommand=memmon\n[fcgi-program:f]\ncommand=f\n"
            "[weird]\nx=1\n")
        self.assertEqual([(app["name"], app.get("namespace"), app["autorestart"], app.get("stop_exit_codes"))
                          for app in apps], [("early", "backend", True, [0, 2]), ("late", "backend", True, [0])])
        self.assertEqual(warnings, [
            "[unix_http_server] noted and skipped: the daemon's own settings are `web` flags",
            "[supervisord] noted and skipped: the daemon's own settings are `web` flags",
            "[rpcinterface:supervisor] noted and skipped: the daemon's own settings are `web` flags",
            "[program:early] killasgroup false: the whole process group is stopped here all the same",
            "[program:early] stdout_syslog skipped: logs go to files and the API, not syslog",
            "[eventlistener:memmon] not supported: pmdaemon runs programs, not event listeners",
            "[fcgi-program:f] not supported: pmdaemon runs programs, not FastCGI sockets",
            "[weird] skipped: not a supervisord section"])

    def test_every_documented_program_key_is_known(self):
        documented = ("command process_name numprocs numprocs_start priority autostart startsecs startretries "
                      "autorestart exitcodes stopsignal stopwaitsecs stopasgroup killasgroup user redirect_stderr "
                      "stdout_logfile stdout_logfile_maxbytes stdout_logfile_backups stdout_capture_maxbytes "
                      "stdout_events_enabled stdout_syslog stderr_logfile stderr_logfile_maxbytes "
                      "stderr_logfile_backups stderr_capture_maxbytes stderr_events_enabled stderr_syslog "
                      "environment directory umask serverurl").split()
        values = {"command": "sleep 1", "process_name": "%(program_name)s_%(process_num)d", "numprocs": "2",
                  "autorestart": "unexpected", "exitcodes": "0", "stopsignal": "TERM", "umask": "022",
                  "environment": "A=1", "directory": "/tmp", "stdout_logfile": "/tmp/o.log", "stderr_logfile": "/tmp/e.log",
                  "stdout_logfile_maxbytes": "1MB", "stderr_logfile_maxbytes": "1MB", "user": "nobody"}
        text = "[program:k]\n" + "".join("%s=%s\n" % (key, values.get(key, "1" if key.endswith(
            ("secs", "retries", "priority", "start", "backups", "maxbytes")) else "true")) for key in documented)
        apps, warnings = self.read(text)
        self.assertEqual([text for text in warnings if "not a supervisord" in text], [])
        self.assertEqual([pmdaemon.validate_app(app)[1] for app in apps], [[], []])

    def test_include_files(self):
        os.mkdir(os.path.join(self.dir, "conf.d"))
        with open(os.path.join(self.dir, "conf.d", "a.conf"), "w") as handle:
            handle.write("[program:included]\ncommand=sleep 5\nautorestart=false\n")
        apps, warnings = self.read("[include]\nfiles = conf.d/*.conf\n")
        self.assertEqual([(app["name"], app["autorestart"]) for app in apps], [("included", False)])
        self.assertEqual(warnings, ["[include] read: 1 file(s)"])

    def test_errors_name_section_and_key(self):
        for text, said in (("[program:a]\ncommand=x %(ENV_NOPE)s\n", "[program:a] command: %(ENV_NOPE)s names nothing"),
                           ("[program:a]\ncommand=x\nnumprocs=2\nprocess_name=a\n",
                            "[program:a]: numprocs is 2 but process_name 'a' has no %(process_num)"),
                           ("[program:a]\nautostart=x\n", "[program:a]: command is required"),
                           ("[program:a]\ncommand=x\nautostart=maybe\n", "[program:a] autostart: 'maybe' is not true"),
                           ("[program:a\ncommand=x\n", "File contains no section headers")):
            with self.assertRaises(pmdaemon.ConfigFileError) as caught:
                self.read(text)
            self.assertIn(said, str(caught.exception))


class TestPm2ToNative(unittest.TestCase):
    """Every PM2 key is honoured, mapped or skipped with a one-line warning; never an error."""

    def native(self, app, env_name=None):
        config, warnings = pmdaemon.pm2_to_native(app, env_name, "/srv/app")
        return config, warnings

    def test_frequent_keys(self):
        config, warnings = self.native({
            "name": "api", "script": "server.js", "env": {"PORT": 3000, "ON": True}, "env_production": {"NODE_ENV": "production"},
            "watch": ["src"], "ignore_watch": ["logs"], "instances": "2", "exec_mode": "fork", "cwd": "api",
            "autorestart": False, "args": "--a 'b c'", "max_memory_restart": "300M", "error_file": "logs/err.log",
            "out_file": "/var/log/out.log", "time": True, "max_restarts": "10", "kill_timeout": 3000,
            "restart_delay": "500", "min_uptime": "1h", "listen_timeout": 8000, "cron_restart": "0 0 * * * *",
            "exp_backoff_restart_delay": 100, "merge_logs": True, "log_file": "combined.log", "node_args": "--inspect",
            "interpreter_args": ["--harmony"]}, "production")
        self.assertEqual(config, {
            "name": "api", "script": "server.js", "env": {"PORT": "3000", "ON": "true", "NODE_ENV": "production"},
            "watch": ["src"], "watch_ignore": list(pmdaemon.WATCH_IGNORE_DEFAULT) + ["logs"], "instances": 2,
            "cwd": "/srv/app/api", "autorestart": False, "args": ["--a", "b c"], "max_memory_restart": "300M",
            "error_file": "/srv/app/api/logs/err.log", "out_file": "/var/log/out.log", "log_date_format": "iso",
            "max_restarts": 10, "kill_timeout": 3000, "restart_delay": "500", "min_uptime": "60m", "listen_timeout": 8000,
            "cron_restart": "0 * * * *", "exp_backoff_restart_delay": 100, "interpreter": "node",
            "interpreter_args": ["--inspect", "--harmony"]})
        self.assertEqual(warnings, [
            "api: log_file skipped: one combined log file is not kept; stdout and stderr have their own files (`logs` shows both)",
            "api: cron_restart '0 0 * * * *': the seconds field is dropped (minutes are the finest here)"])
        self.assertEqual(pmdaemon.validate_app(config)[1], [])

    def test_interpreter_is_kept_and_extensions_choose_one(self):
        self.assertEqual(self.native({"script": "worker.py", "interpreter": "python3"})[0]["interpreter"], "python3")
        self.assertEqual(self.native({"script": "w.py", "interpreter": "/opt/py/bin/python"})[0]["script"], "w.py")
        self.assertEqual(self.native({"script": "w.py"})[0]["interpreter"], "python3")
        self.assertEqual(self.native({"script": "w.sh"})[0]["interpreter"], "bash")
        self.assertNotIn("interpreter", self.native({"script": "./w.js", "interpreter": "none"})[0])
        self.assertNotIn("interpreter", self.native({"script": "gunicorn"})[0])
        self.assertEqual(self.native({"name": "n", "script": "npm run start"}),
                         ({"name": "n", "script": "npm", "args": ["run", "start"], "cwd": "/srv/app"},
                          ["n: script 'npm run start' is a command line; it runs as npm with arguments ['run', 'start']"]))

    def test_instances_forms_and_cluster(self):
        cpus = pmdaemon.cpu_count()
        for value, count in (("max", cpus), ("MAX", cpus), (0, cpus), (-1, max(1, cpus - 1)), ("3", 3), (500, 64)):
            self.assertEqual(self.native({"name": "a", "script": "x", "instances": value})[0]["instances"], count, value)
        config, warnings = self.native({"name": "c", "script": "x", "exec_mode": "cluster", "instances": 2})
        self.assertEqual((config["instances"], warnings), (2, [
            "c: exec_mode cluster: 2 separate processes; there is no shared listening socket, so give each its own "
            "port (port: \"3000-3003\")"]))

    def test_logs_time_and_dates(self):
        self.assertEqual(self.native({"name": "a", "script": "x", "time": False})[0]["log_date_format"], "none")
        config, warnings = self.native({"name": "a", "script": "x", "log_date_format": "YYYY-MM-DD HH:mm:ss"})
        self.assertEqual((config["log_date_format"], warnings), ("iso", [
            "a: log_date_format 'YYYY-MM-DD HH:mm:ss': lines are stamped in ISO 8601 (UTC) instead"]))
        config, warnings = self.native({"name": "a", "script": "x", "out_file": "/dev/null", "combine_logs": True})
        self.assertEqual((config.get("out_file"), config.get("merge_logs")), (None, None))
        self.assertEqual(warnings, ["a: out_file /dev/null skipped: output is kept in pmdaemon's rotated logs"])

    def test_wait_ready_increment_var_and_skipped_keys(self):
        config, warnings = self.native({"name": "w", "script": "x", "wait_ready": True, "instances": 2,
                                        "increment_var": "PORT", "env": {"PORT": 4000}, "instance_var": "ID",
                                        "pid_file": "/tmp/p", "source_map_support": True, "vizion": False})
        self.assertEqual((config["port"], config["env"], config.get("wait_ready")), ("4000-4001", {}, None))
        self.assertEqual(warnings, [
            "w: instance_var skipped: NODE_APP_INSTANCE and PM2_INSTANCE_ID are always set",
            "w: pid_file skipped: pids are in `ls`/`info` and GET /api/processes, not in files",
            "w: source_map_support skipped: a node runtime option of PM2's own wrapper",
            "w: vizion skipped: PM2's git metadata",
            "w: wait_ready skipped: there is no process.send('ready') here; add a health_check to wait for "
            "readiness (listen_timeout kept)"])

    def test_every_documented_pm2_key_is_known(self):
        documented = ("name script cwd args interpreter interpreter_args node_args instances exec_mode watch "
                      "ignore_watch watch_options max_memory_restart env env_production source_map_support "
                      "instance_var filter_env log_date_format error_file out_file log_file combine_logs merge_logs "
                      "pid_file min_uptime listen_timeout kill_timeout shutdown_with_message wait_ready max_restarts "
                      "restart_delay autorestart cron_restart vizion post_update force exp_backoff_restart_delay "
                      "increment_var time namespace stop_exit_codes treekill windowsHide append_env_name "
                      "disable_logs log_type uid gid").split()
        app = {key: None for key in documented}
        app.update(name="all", script="x")
        _, warnings = self.native(app)
        self.assertEqual([text for text in warnings if "not a PM2" in text], [])


# -- files of processes: apply -----------------------------------------------------------------

class TestApplyPlan(unittest.TestCase):
    """The plan of apply: create, update with changed keys, unchanged, delete (only its own), errors."""

    def loaded(self, apps, origin="file:/srv/eco.json"):
        return pmdaemon.AppsFile(apps, ["w"], "json", origin)

    def test_create_update_unchanged_and_prune_only_own(self):
        home = tempfile.gettempdir()
        same, _ = pmdaemon.validate_app({"name": "same", "script": "sleep", "cwd": home, "origin": "file:/srv/eco.json"})
        changed = dict(same, name="changed", restart_delay=5)
        current = {"same": same, "changed": changed,
                   "gone": dict(same, name="gone"), "other": dict(same, name="other", origin="file:/srv/other.json"),
                   "manual": dict(same, name="manual", origin=None)}
        apps = [{"name": "new", "script": "sleep", "cwd": home, "origin": "file:/srv/eco.json"},
                {"name": "same", "script": "sleep", "cwd": home, "origin": "file:/srv/eco.json"},
                {"name": "changed", "script": "sleep", "cwd": home, "origin": "file:/srv/eco.json"}]
        plan = pmdaemon.apply_plan(self.loaded(apps), current, prune=True)
        self.assertEqual((plan["create"], plan["update"], plan["unchanged"], plan["delete"], plan["errors"]),
                         (["new"], [{"name": "changed", "changed": ["restart_delay"]}], ["same"], ["gone"], []))

    def test_every_error_is_listed_with_app_and_field(self):
        plan = pmdaemon.apply_plan(self.loaded([
            {"name": "a b", "script": "x", "instances": 0, "kill_signal": "SIGNOPE", "cwd": "/"},
            {"script": None, "name": "ok", "cwd": "/"}, {"name": "ok", "script": "y", "cwd": "/"},
            {"name": "ok", "script": "z", "cwd": "/"}]), {}, prune=False)
        self.assertEqual([(error["app"], error["field"]) for error in plan["errors"]],
                         [("a b", "name"), ("a b", "instances"), ("a b", "kill_signal"), ("ok", "script"), ("ok", "name")])
        self.assertEqual(plan["errors"][-1]["message"], "the name 'ok' is used twice")

    def test_dependencies_come_first_and_must_exist(self):
        plan = pmdaemon.apply_plan(self.loaded([
            {"name": "web", "script": "x", "cwd": "/", "depends_on": ["db"]}, {"name": "db", "script": "x", "cwd": "/"},
            {"name": "job", "script": "x", "cwd": "/", "depends_on": ["queue"]}]), {}, prune=False)
        self.assertEqual([app["name"] for app in plan["apps"]], ["db", "web", "job"])
        self.assertEqual(plan["errors"], [{"app": "job", "field": "depends_on",
                                           "message": "depends_on names 'queue', which is neither in the file nor running"}])

    def test_missing_program_or_directory_is_a_warning(self):
        plan = pmdaemon.apply_plan(self.loaded([{"name": "a", "script": "./nope.js", "interpreter": "node",
                                                 "cwd": "/nonexistent/dir"}]), {}, prune=False)
        self.assertEqual((plan["errors"], plan["warnings"]), ([], ["w", "a: cwd /nonexistent/dir does not exist"]))


class TestCliApplyFiles(DaemonTestCase):
    """apply/start/convert of PM2 and supervisord files, and the PM2 verbs, through the CLI."""

    cli = TestCli.cli
    run_cli = TestCli.run_cli

    def write(self, name, text):
        path = os.path.join(self.daemon.home, name)
        with open(path, "w") as handle:
            handle.write(text)
        return path

    def test_dry_run_changes_nothing_and_prints_the_plan(self):
        path = self.write("dry.config.js", "module.exports = { apps: [{ name: 'dry-a', script: 'sleep', args: '60', "
                          "interpreter: 'none', log_file: 'x.log' }, { name: 'dry-b', script: './gone.js', "
                          "cwd: '/nonexistent/project' }] };\n")
        code, out = self.cli("apply", path, "--dry-run")
        self.assertEqual((code, out.splitlines()), (0, [
            "warning: dry-a: log_file skipped: one combined log file is not kept; stdout and stderr have their own "
            "files (`logs` shows both)", "warning: dry-b: cwd /nonexistent/project does not exist",
            "create dry-a", "create dry-b"]))
        self.assertNotIn("dry-a", self.cli("ls")[1])
        code, out = self.cli("apply", path, "--dry-run", "--json")
        plan = json.loads(out)
        self.assertEqual((plan["create"], plan["dry_run"], plan["format"]), (["dry-a", "dry-b"], True, "js"))
        code, out = self.cli("apply", path)                 # for real: the missing cwd stops it, nothing applied
        self.assertEqual(code, 1)
        self.assertIn("dry-b: cwd /nonexistent/project does not exist; nothing applied", self.last_stderr)
        self.assertNotIn("dry-a", self.cli("ls")[1])

    def test_apply_is_atomic_and_converges(self):
        path = self.write("conv.json", '// ours\n[{"name": "conv-a", "script": "sleep", "args": ["60"], '
                          '"restart_delay": 900, "kill_timeout": "3s",},]')
        self.assertEqual(self.cli("apply", path), (0, "conv-a: created\n"))
        self.write("conv.json", '[{"name": "conv-a", "script": "sleep", "args": ["60"]}, '
                   '{"name": "conv-b", "script": "sleep", "instances": "lots", "max_restarts": -1}]')
        code, out = self.cli("apply", path)
        self.assertEqual((code, out.splitlines()), (1, [
            "error: conv-b: field 'instances' must be an integer, got string \"lots\"",
            "error: conv-b: field 'max_restarts' must be between 0 and 1000000, got -1"]))
        self.assertEqual(self.daemon.process("conv-a")["config"]["restart_delay"], 900)      # nothing applied
        code, out = self.cli("apply", path, "--json")
        self.assertEqual([(error["app"], error["field"]) for error in json.loads(out)["errors"]],
                         [("conv-b", "instances"), ("conv-b", "max_restarts")])
        self.write("conv.json", '{"name": "conv-a", "script": "sleep", "args": ["60"]}')     # a single app
        self.assertEqual(self.cli("apply", path, "--dry-run"), (0, "update conv-a (kill_timeout, restart_delay)\n"))
        self.assertEqual(self.cli("apply", path), (0, "conv-a: updated (restarted)\n"))
        config = self.daemon.process("conv-a")["config"]
        self.assertEqual((config["restart_delay"], config["kill_timeout"]),
                         (pmdaemon.DEFAULT_RESTART_DELAY_MS, pmdaemon.DEFAULT_KILL_TIMEOUT_MS))
        self.cli("delete", "conv-a")

    def test_prune_keeps_other_files_and_namespaces(self):
        mine = self.write("mine.yml", "apps:\n  - name: prune-a\n    script: sleep\n    args: '60'\n"
                          "  - name: prune-b\n    script: sleep\n    args: '60'\n")
        theirs = self.write("theirs.conf", "[program:prune-t]\ncommand=sleep 60\n[group:team]\nprograms=prune-t\n")
        self.assertEqual(self.cli("apply", mine)[0], 0)
        self.assertEqual(self.cli("start", theirs)[1], "prune-t: created\n")          # start FILE = apply
        self.assertEqual(self.daemon.process("prune-t")["config"]["namespace"], "team")
        self.write("mine.yml", "apps:\n  - name: prune-a\n    script: sleep\n    args: '60'\n")
        self.assertEqual(self.cli("apply", mine, "--prune", "--dry-run")[1], "unchanged prune-a\ndelete prune-b\n")
        self.assertEqual(self.cli("apply", mine, "--prune")[1].splitlines(),
                         ["prune-a: unchanged", "prune-b: deleted (created by %s, no longer in it)" % mine])
        self.assertEqual(self.daemon.process("prune-t")["status"], "online")
        self.cli("delete", "prune-a")
        self.cli("delete", "prune-t")

    def test_start_name_refuses_another_program_unless_forced(self):
        self.cli("start", "sleep", "--name", "force-a", "--", "60")
        code, out = self.cli("start", "true", "--name", "force-a")
        self.assertEqual(code, 1)
        self.assertEqual(self.last_stderr, "pmdaemon: force-a already runs sleep 60; use another --name, or --force "
                         "to replace its program\n")
        code, out = self.cli("start", "true", "--name", "force-a", "--json")
        self.assertEqual(json.loads(out)["success"], False)
        self.assertEqual(self.cli("start", "sleep", "--name", "force-a", "--force", "--no-autorestart",
                                  "--namespace", "ns1", "--cron", "0 3 * * *", "-i", "max", "--", "30")[0], 0)
        config = self.daemon.process("force-a-0" if pmdaemon.cpu_count() > 1 else "force-a")["config"]
        self.assertEqual((config["args"], config["autorestart"], config["namespace"], config["cron_restart"],
                          config["instances"]), (["30"], False, "ns1", "0 3 * * *", pmdaemon.cpu_count()))
        self.cli("delete", "force-a")

    def test_signal_send_and_describe(self):
        script = write_script(os.path.join(self.daemon.home, "reader.sh"),
                              "trap 'echo got-usr2' USR2\necho ready\nwhile true; do read line && echo \"in:$line\"; done")
        self.daemon.start("verbs-a", script, [], stdin=True)
        wait_until(lambda: self.daemon.last_line("verbs-a") == "ready", message="the trap set")   # no signal before it
        self.assertEqual(self.cli("signal", "SIGUSR2", "verbs-a"), (0, "verbs-a: sent SIGUSR2\n"))
        wait_until(lambda: self.daemon.last_line("verbs-a") == "got-usr2", message="the trap's line")
        self.assertEqual(self.cli("send", "verbs-a", "hello", "there"), (0, "12 bytes written to the stdin of 'verbs-a'\n"))
        wait_until(lambda: self.daemon.last_line("verbs-a") == "in:hello there", message="the line sent")
        lines = self.cli("logs", "verbs-a", "--json", "--lines", "1")[1].splitlines()
        self.assertEqual([json.loads(line)["message"] for line in lines], ["in:hello there"])
        code, out = self.cli("monit", "--json")
        self.assertEqual((code, json.loads(out)["error"]["code"]), (2, "USAGE"))
        code, out = self.cli("describe", "verbs-a")
        self.assertEqual(code, 0)
        self.assertRegex(out, r"\nstdin +true\n")
        self.assertRegex(out, r"\nkill_timeout +%d\n" % pmdaemon.DEFAULT_KILL_TIMEOUT_MS)
        self.assertEqual(self.cli("signal", "NOPE", "verbs-a")[0], 2)
        code, out = self.cli("signal", "USR1", "verbs-missing", "--json")
        self.assertEqual((code, json.loads(out)["error"]["code"]), (1, "PROCESS_NOT_FOUND"))
        self.cli("delete", "verbs-a")

    def test_convert_prints_native_json(self):
        path = self.write("conv.config.js", "module.exports = { apps: [{ name: 'cv', script: 'app.py', "
                          "instances: 2, time: true, deploy_key: 1 }] };\n")
        code, out = self.cli("convert", path)
        self.assertEqual(json.loads(out), {"pmdaemon": 1, "apps": [
            {"name": "cv", "script": "app.py", "cwd": self.daemon.home, "instances": 2, "interpreter": "python3"}]})
        self.assertIn("warning: cv: deploy_key skipped: not a PM2 or pmdaemon setting", self.last_stderr)
        native = self.write("native.json", out)
        self.assertEqual(self.cli("apply", native, "--dry-run")[1], "warning: cv: script %s does not exist\ncreate cv\n"
                         % os.path.join(self.daemon.home, "app.py"))


class TestDaemonUpgrade(unittest.TestCase):
    """`upgrade` (SIGUSR2): the daemon execs the pmdaemon.py now on disk in place. Each test runs
    a copy of pmdaemon.py, so that it can change the file under the daemon."""

    def setUp(self):
        self.directory = temp_dir(self)
        self.script = os.path.join(self.directory, "pmdaemon.py")
        shutil.copy(PMDAEMON, self.script)
        self.daemon = Daemon(script=self.script, args=("--quiet",))
        self.addCleanup(self.daemon.cleanup)

    def upgrade(self, *args):
        """Run the `upgrade` verb (of the suite's pmdaemon.py: the copy may be broken on purpose):
        (exit status, stdout, stderr)."""
        environ = dict(os.environ, PMDAEMON_HOME=self.daemon.home)
        result = subprocess.run([PY, PMDAEMON, "upgrade"] + list(args), env=environ, timeout=90, **CAPTURE)
        return result.returncode, result.stdout.decode(), result.stderr.decode()

    def counter(self, name, partial=False):
        """An app writing numbered lines as fast as it can; `partial`: each line in two writes,
        with a pause between, so that a hand-over is likely to find half a line."""
        body = ("import sys, time\nfor n in range(10 ** 9):\n"
                + ("    sys.stdout.write('part-%d' % n); sys.stdout.flush(); time.sleep(0.001)\n"
                   "    sys.stdout.write(' end-%d\\n' % n); sys.stdout.flush()\n" if partial else
                   "    print('line-%d' % n, flush=True)\n    if n % 50 == 0: time.sleep(0.001)\n"))
        path = os.path.join(self.directory, name + ".py")
        with open(path, "w") as handle:
            handle.write(body)
        return self.daemon.start(name, PY, [path])

    def assertEveryLineOnce(self, name, partial=False):
        """The stdout log holds lines 0..N in order, each once and whole (but the last one of
        an app stopped in the middle of a line)."""
        with open(os.path.join(self.daemon.home, "logs", name + "-out.log")) as handle:
            lines = handle.read().splitlines()
        if partial and not lines[-1].endswith(" end-%s" % lines[-1].rsplit("-", 1)[-1]):
            lines.pop()
        pattern = re.compile(r"^part-(\d+) end-(\d+)$" if partial else r"^line-(\d+)$")
        numbers = []
        for line in lines:
            match = pattern.match(line.split(" ", 1)[-1])      # after the timestamp
            self.assertIsNotNone(match, "a torn or foreign line: %r" % line)
            if partial:
                self.assertEqual(match.group(1), match.group(2), line)
            numbers.append(int(match.group(1)))
        self.assertEqual(numbers, list(range(len(numbers))))
        return len(numbers)

    def test_apps_keep_their_pids_and_every_log_line(self):
        names = ["upg-%d" % index for index in range(4)]
        for index, name in enumerate(names):
            self.counter(name, partial=index % 2 == 1)
        pids = {name: self.daemon.wait_status(name, "online")["pid"] for name in names}
        time.sleep(0.5)
        with open(self.script, "a") as handle:
            handle.write("\n# a new version\n")
        code, out, err = self.upgrade()
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out, "upgraded the daemon in place (pid %d); its processes kept running\n" % self.daemon.proc.pid)
        self.assertIsNone(self.daemon.proc.poll())
        for name in names:
            process = self.daemon.process(name)
            self.assertEqual((process["pid"], process["status"], process["restarts"]), (pids[name], "online", 0))
        time.sleep(0.5)
        for name in names:
            self.assertEqual(self.daemon.post("/api/processes/%s/stop" % name)[0], 200)
        for index, name in enumerate(names):
            self.assertGreater(self.assertEveryLineOnce(name, partial=index % 2 == 1), 100)
        with open(os.path.join(self.daemon.home, "pmdaemon.pyc"), "rb") as handle:
            with open(self.script, "rb") as source:
                self.assertEqual(handle.read(len(pmdaemon.code_cache_header(b"", ""))),
                                 pmdaemon.code_cache_header(source.read(), self.script))

    def test_connections_wait_in_the_backlog_and_websockets_get_1012(self):
        self.daemon.start("upg-sleep", "sleep", ["60"])
        client = WsClient(self.daemon.port)
        self.addCleanup(client.close)
        client.recv_message("process_update")
        refused, answered, stop = [], [], []

        def hammer():
            while not stop:
                try:
                    with socket.create_connection(("127.0.0.1", self.daemon.port), timeout=10) as sock:
                        sock.sendall(b"GET /api/processes HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                        answered.append(status_of(recv_all(sock, 10)))
                except ConnectionRefusedError as exc:
                    refused.append(exc)
        import threading
        thread = threading.Thread(target=hammer)
        thread.start()
        try:
            wait_until(lambda: len(answered) > 20, message="answers before the upgrade")
            code, _, err = self.upgrade()
            self.assertEqual((code, err), (0, ""))
            count = len(answered)
            wait_until(lambda: len(answered) > count + 20, message="answers after the upgrade")
        finally:
            stop.append(True)
            thread.join()
        self.assertEqual(refused, [])
        self.assertEqual(set(answered), {200})
        self.assertEqual(client.recv_close(), 1012)
        again = WsClient(self.daemon.port)              # what the dashboard and monit do
        self.addCleanup(again.close)
        self.assertEqual(again.recv_message("process_update")["data"]["name"], "upg-sleep")

    def test_a_file_that_would_not_work_is_refused_and_the_daemon_keeps_serving(self):
        self.daemon.start("upg-keep", "sleep", ["60"])
        pid = self.daemon.wait_status("upg-keep", "online")["pid"]
        with open(self.script) as handle:
            good = handle.read()
        with open(self.script, "w") as handle:
            handle.write(good + "\ndef broken(:\n")
        line = good.count("\n") + 2
        self.assertEqual(self.upgrade(), (1, "", "pmdaemon: upgrade refused: %s does not compile: invalid syntax "
                                                "(line %d)\n" % (self.script, line)))
        with open(self.script, "w") as handle:
            handle.write(good.replace(pmdaemon.UPGRADE_ENV, "PMDAEMON_SOMETHING"))
        self.assertEqual(self.upgrade(), (1, "", "pmdaemon: upgrade refused: %s cannot adopt running processes "
                                                "(it predates upgrades): restart the daemon instead\n" % self.script))
        with open(self.script, "w") as handle:
            handle.write(good)
        code, out, err = self.upgrade("--web", "--port nope")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, "pmdaemon: upgrade refused: bad web options: pmdaemon.py web: error: argument --port: "
                              "'nope' is not a whole number\n")
        self.assertEqual(self.daemon.get("/api/processes")[0], 200)
        self.assertEqual(self.daemon.process("upg-keep")["pid"], pid)
        self.assertIsNone(self.daemon.proc.poll())

    def test_adopted_apps_can_be_signalled_fed_stopped_and_their_exits_are_seen(self):
        trap = write_script(os.path.join(self.directory, "trap.sh"),
                            "trap 'echo got-usr2' USR2\nwhile true; do read line && echo \"in:$line\"; done")
        self.daemon.start("upg-trap", trap, [], stdin=True)
        self.daemon.start("upg-stop", "sleep", ["60"])
        self.daemon.start("upg-crash", "sleep", ["60"], restart_delay=0)
        pids = {name: self.daemon.wait_status(name, "online")["pid"] for name in ("upg-trap", "upg-stop", "upg-crash")}
        code, _, err = self.upgrade("--web", "--port 0 --sample-interval 0.2")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(self.daemon.post("/api/processes/upg-trap/signal", {"signal": "SIGUSR2"})[0], 200)
        wait_until(lambda: self.daemon.last_line("upg-trap") == "got-usr2", message="the trap's line")
        self.assertEqual(self.daemon.post("/api/processes/upg-trap/stdin", {"data": "hello\n"})[0], 200)
        wait_until(lambda: self.daemon.last_line("upg-trap") == "in:hello", message="the line sent")
        self.assertEqual(self.daemon.post("/api/processes/upg-stop/stop")[0], 200)
        self.assertEqual(self.daemon.process("upg-stop")["status"], "stopped")
        self.assertFalse(pid_alive(pids["upg-stop"]))
        os.kill(pids["upg-crash"], signal.SIGKILL)
        crashed = wait_until(lambda: (self.daemon.process("upg-crash") or {}).get("restarts") == 1
                             and self.daemon.process("upg-crash"), message="the exit to be seen")
        self.assertNotEqual(crashed["pid"], pids["upg-crash"])
        self.assertEqual(self.daemon.process("upg-crash")["last_exit"]["signal"], "SIGKILL")
        self.assertEqual(self.daemon.post("/api/processes/upg-trap/restart")[0], 200)
        self.assertNotEqual(self.daemon.process("upg-trap")["pid"], pids["upg-trap"])
        self.assertFalse(pid_alive(pids["upg-trap"]))
        self.assertEqual(self.daemon.terminate(), 0)
        self.assertFalse(any(pid_alive(pid) for pid in pids.values()))

    def test_a_daemon_that_predates_upgrades_is_not_signalled(self):
        sleeper = subprocess.Popen(["sleep", "60"])         # no SIGUSR2 handler: it would die of it
        self.addCleanup(sleeper.wait)
        self.addCleanup(sleeper.kill)
        self.assertTrue(pmdaemon.catches_signal(self.daemon.proc.pid, signal.SIGUSR2))
        self.assertFalse(pmdaemon.catches_signal(sleeper.pid, signal.SIGUSR2))
        with open(os.path.join(self.daemon.home, "pmdaemon.lock"), "w") as handle:
            handle.write("%d\n" % sleeper.pid)       # running_daemon(): the lock's pid, the socket answers
        self.assertEqual(self.upgrade(), (1, "", "pmdaemon: the daemon (pid %d) cannot upgrade itself (it predates "
                                                "upgrades): stop it with `kill` once, and the next command starts "
                                                "the new one\n" % sleeper.pid))
        self.assertIsNone(sleeper.poll())

    def test_systemd_hears_reloading_then_ready_from_the_same_pid(self):
        self.assertIn("\nExecReload=/bin/kill -USR2 $MAINPID\n", pmdaemon.systemd_unit("/h", "u"))
        path = os.path.join(self.directory, "notify")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(listener.close)
        listener.bind(path)
        listener.settimeout(20)
        daemon = Daemon(script=self.script, env={"NOTIFY_SOCKET": path})
        self.addCleanup(daemon.cleanup)
        self.assertIn("READY=1\nMAINPID=%d\n" % daemon.proc.pid, listener.recv(4096).decode())
        daemon.proc.send_signal(signal.SIGUSR2)
        reloading = listener.recv(4096).decode()
        self.assertRegex(reloading, r"^RELOADING=1\nMONOTONIC_USEC=\d+\n")
        self.assertIn("READY=1\nMAINPID=%d\n" % daemon.proc.pid, listener.recv(4096).decode())
        self.assertEqual(daemon.get("/api/processes")[0], 200)


def run_echo_server(port):
    import asyncio

    async def main():
        server = await asyncio.start_server(serve_echo_connection, "127.0.0.1", port)
        print("ws-echo listening on ws://127.0.0.1:%d/" % server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()        # until killed (Server.serve_forever is 3.7+)
    run_loop(main())


# ----------------------------------------------------------------------------------------------
# `python3 test_pmdaemon.py ws-echo PORT`: pmdaemon's WebSocket stack as an echo server (its entry,
# run_echo_server, stays just above: after the last TestCase, where new test classes go)
# ----------------------------------------------------------------------------------------------

ECHO_MAX_MESSAGE = 16 * 1024 * 1024


async def serve_echo_connection(reader, writer):
    """HTTP parser + handshake + WsSession from pmdaemon, echoing every message back."""
    parser = pmdaemon.RequestParser()
    request = None
    try:
        while request is None:
            data = await reader.read(65536)
            if not data:
                return
            parser.feed(data)
            request = parser.next_request()
        accept = pmdaemon.check_handshake(request)
    except pmdaemon.PMDaemonError as error:
        writer.write(pmdaemon.serialize_response(pmdaemon.error_response(error), pmdaemon.http_date(), False))
        writer.close()
        return
    writer.write(pmdaemon.serialize_response(pmdaemon.Response(101, headers=pmdaemon.handshake_headers(accept)),
                                             pmdaemon.http_date(), True))

    def echo(session, event):
        opcode = pmdaemon.Opcode.TEXT if event.kind == "text" else pmdaemon.Opcode.BINARY
        payload = event.data.encode("utf-8") if event.kind == "text" else event.data
        session.send(pmdaemon.encode_frame(opcode, payload))

    session = pmdaemon.WsSession(reader, writer, pmdaemon.WsProtocol(ECHO_MAX_MESSAGE, 1 << 20), echo,
                                 send_buffer=4 * ECHO_MAX_MESSAGE)
    session.leftover = bytes(parser.buffer)
    await session.run()


# ----------------------------------------------------------------------------------------------
# `python3 test_pmdaemon.py bench [SECONDS [ROUNDS]] [ROW...]`: every performance row of the
# daemon, each beside a baseline measured in the same minute (medians of interleaved rounds)
# ----------------------------------------------------------------------------------------------

BASELINE_SERVER = """
import asyncio, sys
RESPONSE = open(sys.argv[1], "rb").read()
async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\\r\\n\\r\\n")
            writer.write(RESPONSE)
            if writer.transport.get_write_buffer_size() > 65536:
                await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()
asyncio.new_event_loop().run_until_complete(main())
"""

# The floor of "restart a child": asyncio notices the exit and spawns again, nothing else.
BASELINE_RESPAWNER = """
import asyncio
async def main():
    while True:
        child = await asyncio.create_subprocess_exec("sleep", "600")
        print(child.pid, flush=True)
        await child.wait()
loop = asyncio.new_event_loop()
asyncio.set_event_loop(loop)            # the child watcher of 3.6-3.11 needs the loop set
loop.run_until_complete(main())
"""

# The floor of sampling: read /proc/PID/stat of the given pids once a second.
BASELINE_SAMPLER = """
import sys, time
pids = sys.argv[1:]
while True:
    for pid in pids:
        with open("/proc/%s/stat" % pid, "rb") as handle:
            handle.read()
    time.sleep(1)
"""

BENCH_ROWS = ("http", "soak", "restart", "cli", "keepalive", "ws", "cpu", "logs")


class BenchTable:
    """Rows of measure | pmdaemon | baseline | ratio | goal | met, printed as they come and
    again together at the end."""

    def __init__(self):
        self.rows = []

    def add(self, measure, ours, baseline, ratio, goal, met):
        row = (measure, ours, baseline, ratio, goal, "-" if met is None else "yes" if met else "NO")
        self.rows.append(row)
        print("  %s: %s | baseline %s | %s | goal %s | %s" % row, flush=True)

    def render(self):
        header = ("measure", "pmdaemon", "baseline", "ratio", "goal", "met")
        widths = [max(len(str(row[index])) for row in self.rows + [header]) for index in range(6)]
        lines = [" | ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
                 for row in [header, tuple("-" * width for width in widths)] + self.rows]
        return "\n".join(lines)


def median(values):
    import statistics
    return statistics.median(values)


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as handle:
        return int([line for line in handle if line.startswith("VmRSS")][0].split()[1])


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def cpu_seconds(pid):
    """CPU time used by pid's threads now: from the scheduler, in nanoseconds, where the kernel
    keeps it (schedstat), else utime + stime, which the kernel counts in whole clock ticks by
    sampling (a daemon waking briefly ten times a second is mismeasured that way)."""
    try:
        used = 0
        for thread in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/schedstat" % (pid, thread)) as handle:
                used += int(handle.read().split()[0])
        return used / 1e9
    except (OSError, ValueError, IndexError):
        pass
    with open("/proc/%d/stat" % pid) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk_run(port, path, seconds, connections=50):
    """(requests/s, requests done, error lines) of one wrk run."""
    output = subprocess.run(["wrk", "-t2", "-c%d" % connections, "-d%ds" % seconds,
                             "http://127.0.0.1:%d%s" % (port, path)],
                            **CAPTURE, universal_newlines=True, check=True).stdout
    errors = [line.strip() for line in output.splitlines() if "Non-2xx" in line or "Socket errors" in line]
    rate = float([line for line in output.splitlines() if line.startswith("Requests/sec")][0].split()[1])
    done = int(re.search(r"(\d+) requests in", output).group(1))
    return rate, done, errors


def start_baseline_server(response):
    """A bare asyncio-streams server answering every head with `response`: (process, port)."""
    handle = tempfile.NamedTemporaryFile(delete=False)
    handle.write(response)
    handle.close()
    process = subprocess.Popen([PY, "-c", BASELINE_SERVER, handle.name], stdout=subprocess.PIPE)
    port = int(process.stdout.readline())
    os.unlink(handle.name)
    return process, port


def stop(process):
    process.kill()
    process.wait()
    if process.stdout:
        process.stdout.close()


def run_benchmark(seconds=5, rounds=3, only=()):
    """Every row of the performance issue, side by side with its baseline."""
    unknown = [row for row in only if row not in BENCH_ROWS]
    if unknown:
        print("bench: unknown row %s; rows: %s" % (", ".join(unknown), " ".join(BENCH_ROWS)))
        return 2
    if not shutil.which("wrk") and set(only or BENCH_ROWS) & {"http", "soak"}:
        print("bench: wrk is not installed (Debian/Ubuntu: apt-get install wrk); it drives the rows "
              "http and soak (the others run without it: bench 5 3 restart cli keepalive ws cpu logs)")
        return 2
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows = [row for row in BENCH_ROWS if not only or row in only]
    table = BenchTable()
    print("pmdaemon bench, %s, Python %s, %d cores, %s" % (time.strftime("%Y-%m-%d %H:%M"), sys.version.split()[0],
                                                        os.cpu_count(), os.uname().release), flush=True)
    daemon = Daemon(args=("--sample-interval", "1", "--quiet"))   # stderr is a pipe nobody reads
    try:
        for index in range(20):
            daemon.start("bench-%d" % index, "sleep", ["600"])
        for row in rows:
            globals()["bench_" + row](daemon, table, seconds, rounds)
    finally:
        daemon.terminate()
        daemon.cleanup()
    print("\n" + table.render())
    print("\nreproduce: python3 test_pmdaemon.py bench %d %d %s" % (seconds, rounds, " ".join(only)))
    return 0


def bench_http(daemon, table, seconds, rounds):
    """wrk -t2 -c50 against GET /api/processes (20 processes) and /api/system, interleaved with
    a bare asyncio-streams server returning the same bytes; then both servers' RSS."""
    for path in ("/api/processes", "/api/system"):
        response = daemon.raw(b"GET %s HTTP/1.1\r\nHost: localhost\r\n\r\n" % path.encode(), read_timeout=1)
        baseline, base_port = start_baseline_server(response)
        try:
            ours, theirs = [], []
            for _ in range(rounds):               # interleaved, so both see the same machine load
                rate, _, errors = wrk_run(daemon.port, path, seconds)
                ours.append(rate)
                theirs.append(wrk_run(base_port, path, seconds)[0])
                if errors:
                    print("  pmdaemon errors:", errors)
            ratio = median(ours) / median(theirs)
            table.add("GET %s, %d B, wrk -t2 -c50" % (path, len(response.split(b"\r\n\r\n", 1)[1])),
                      "%.0f req/s" % median(ours), "%.0f req/s" % median(theirs), "%.2fx" % ratio,
                      ">= 0.9x and >= 50k", ratio >= 0.9 and median(ours) >= 50000)
            if path == "/api/processes":
                ours_rss, base_rss = rss_kib(daemon.proc.pid), rss_kib(baseline.pid)
                table.add("daemon RSS, 20 procs, after the wrk rounds", "%.1f MiB" % (ours_rss / 1024),
                          "%.1f MiB" % (base_rss / 1024), "%.2fx" % (ours_rss / base_rss), "<= 1.25x",
                          ours_rss <= 1.25 * base_rss)
        finally:
            stop(baseline)


def bench_soak(daemon, table, seconds, rounds):
    """RSS and open files before and after 1M requests and 1,000 crash/restart cycles."""
    before_rss, before_fds = rss_kib(daemon.proc.pid), fd_count(daemon.proc.pid)
    done = 0
    while done < 1_000_000:
        rate, count, _ = wrk_run(daemon.port, "/api/processes", 10)
        done += count
    daemon.start("bench-crash", "false", [], min_uptime=0, max_restarts=1_000_000, restart_delay=0)
    wait_until(lambda: daemon.process("bench-crash")["restarts"] >= 1000, 120, 0.2, "1,000 restarts")
    daemon.request("DELETE", "/api/processes/bench-crash")
    time.sleep(1)                                # let the last exits and timers settle
    after_rss, after_fds = rss_kib(daemon.proc.pid), fd_count(daemon.proc.pid)
    grown = (after_rss - before_rss) / 1024
    table.add("RSS / fds after %.1fM requests + 1,000 restarts" % (done / 1e6),
              "%.1f -> %.1f MiB, %d -> %d fds" % (before_rss / 1024, after_rss / 1024, before_fds, after_fds),
              "-", "%+.1f MiB" % grown, "flat (< 2 MiB, same fds)", grown < 2 and after_fds <= before_fds)


def bench_restart(daemon, table, seconds, rounds, count=20):
    """SIGKILL of a child to its new pid in GET /api/processes/NAME, against a bare asyncio
    loop that respawns its child and prints the pid (min_uptime 0: no crash loop to give up)."""
    daemon.start("bench-restart", "sleep", ["600"], min_uptime=0, max_restarts=1_000_000)
    ours = []
    with socket.create_connection(("127.0.0.1", daemon.port)) as sock:

        def current_pid():                        # over one keep-alive connection, as a poller would
            sock.sendall(b"GET /api/processes/bench-restart HTTP/1.1\r\nHost: localhost\r\n\r\n")
            return json_of(read_one_response(sock))["pid"]
        for _ in range(count):
            pid = wait_until(current_pid, message="a pid")
            started = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: current_pid() not in (None, pid), interval=0, message="the new pid")
            ours.append((time.perf_counter() - started) * 1000)
    daemon.request("DELETE", "/api/processes/bench-restart")
    respawner = subprocess.Popen([PY, "-c", BASELINE_RESPAWNER], stdout=subprocess.PIPE)
    theirs = []
    pid = int(respawner.stdout.readline())
    for _ in range(count):
        started = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        pid = int(respawner.stdout.readline())
        theirs.append((time.perf_counter() - started) * 1000)
    stop(respawner)
    subprocess.run(["pkill", "-KILL", "-P", str(respawner.pid)], check=False)
    table.add("kill -9 -> new pid in the API (median of %d)" % count, "%.1f ms" % median(ours),
              "%.1f ms (bare respawn)" % median(theirs), "%.2fx" % (median(ours) / median(theirs)),
              "<= 5.5 ms", median(ours) <= 5.5)


def bench_cli(daemon, table, seconds, rounds, count=20):
    """`pmdaemon.py ls` wall time against the bare interpreter, interleaved, with bytecode
    caching on (as on a user's machine)."""
    environ = dict(os.environ, PMDAEMON_HOME=daemon.home)
    environ.pop("PYTHONDONTWRITEBYTECODE", None)
    commands = ([PY, "-c", "pass"], [PY, PMDAEMON, "ls"], [PY, "-m", "pmdaemon", "ls"],
                [PY, "-c", "compile(open(%r, 'rb').read(), 'pmdaemon.py', 'exec')" % PMDAEMON])
    times = [[] for _ in commands]
    for _ in range(count):
        for index, command in enumerate(commands):
            started = time.perf_counter()
            subprocess.run(command, stdout=subprocess.DEVNULL, env=environ, cwd=HERE, check=True)
            times[index].append((time.perf_counter() - started) * 1000)
    bare, script, module, compiling = (median(values) for values in times)
    for label, value in (("python3 pmdaemon.py ls", script), ("python3 -m pmdaemon ls", module)):
        table.add("`%s` wall time (median of %d)" % (label, count), "%.0f ms" % value,
                  "%.0f ms (python3 -c pass)" % bare, "%+.0f ms" % (value - bare), "<= +60 ms", value - bare <= 60)
    table.add("of which compiling pmdaemon.py (a script is never cached)", "%.0f ms" % (compiling - bare), "-",
              "-", "(the floor of the script form)", None)


async def send_head(port, request):
    """A connection that has sent `request` and read the head of its answer: (reader, writer)."""
    import asyncio
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await reader.readuntil(b"\r\n\r\n")
    return reader, writer


async def open_idle_connections(port, count, request):
    """`count` connections that each send `request` once, read its answer, then stay idle."""
    import asyncio
    held = []

    async def one():
        held.append((await send_head(port, request))[1])
    for start in range(0, count, 250):
        await asyncio.gather(*(one() for _ in range(min(250, count - start))))
    return held


def connection_cost(pid, port, count, request):
    """KiB of RSS per idle connection held open to the server `pid`."""
    import asyncio

    async def measure():
        before = rss_kib(pid)
        held = await open_idle_connections(port, count, request)
        await asyncio.sleep(1)
        after = rss_kib(pid)
        for writer in held:
            writer.close()
        await asyncio.sleep(0.5)
        return (after - before) / count
    return run_loop(measure())


def bench_keepalive(daemon, table, seconds, rounds, count=5000):
    """RSS per idle keep-alive connection (after one request each), pmdaemon vs bare server."""
    request = b"GET /api/system HTTP/1.1\r\nHost: localhost\r\n\r\n"
    baseline, base_port = start_baseline_server(daemon.raw(request, read_timeout=1))
    try:
        theirs = connection_cost(baseline.pid, base_port, count, request)
    finally:
        stop(baseline)
    ours = connection_cost(daemon.proc.pid, daemon.port, count, request)
    table.add("idle keep-alive connections (%d held)" % count, "%.1f KiB each" % ours,
              "%.1f KiB each" % theirs, "%.2fx" % (ours / theirs), "<= 6 KiB", ours <= 6)


WS_HANDSHAKE = (b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
TICK_RE = re.compile(rb'"system_update","data":\{.*?"timestamp":"([^"]+)"')


async def ws_clients(port, count, ticks):
    """`count` WebSocket clients; each records when each system_update (keyed by its
    timestamp) reached it. Returns (writers, tasks)."""
    import asyncio
    writers = []

    async def client():
        reader, writer = await send_head(port, WS_HANDSHAKE)
        writers.append(writer)
        while True:
            data = await reader.read(65536)
            if not data:
                return
            for stamp in TICK_RE.findall(data):
                ticks.setdefault(stamp, []).append(time.monotonic())
    tasks = []
    for index in range(count):
        tasks.append(asyncio.ensure_future(client()))
        if index % 250 == 249:
            await asyncio.sleep(0.05)
    deadline = time.monotonic() + 120
    while len(writers) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return writers, tasks


def bench_ws(daemon, table, seconds, rounds, count=10000, timed=1000):
    """KiB of daemon RSS per WebSocket client at `count` clients; at `timed` clients, how late
    each client gets a tick after the first one got it (p99), and REST latency meanwhile."""
    import asyncio
    import threading

    async def measure():
        before = rss_kib(daemon.proc.pid)
        ticks = {}
        writers, tasks = await ws_clients(daemon.port, timed, ticks)
        rest = []

        def poll_rest():
            stop_at = time.monotonic() + 5
            with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
                while time.monotonic() < stop_at:
                    started = time.monotonic()
                    sock.sendall(b"GET /api/processes/bench-0 HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    read_one_response(sock)
                    rest.append((time.monotonic() - started) * 1000)
                    time.sleep(0.01)
        await asyncio.sleep(1)
        ticks.clear()
        poller = threading.Thread(target=poll_rest)
        poller.start()
        await asyncio.sleep(5)
        await asyncio.get_event_loop().run_in_executor(None, poller.join)
        lateness = [(moment - min(moments)) * 1000 for moments in ticks.values() if len(moments) >= timed * 0.9
                    for moment in moments]
        more, more_tasks = await ws_clients(daemon.port, count - timed, {})
        await asyncio.sleep(2)
        after = rss_kib(daemon.proc.pid)
        connected = len(writers) + len(more)
        for writer in writers + more:
            writer.close()
        for task in tasks + more_tasks:
            task.cancel()
        await asyncio.sleep(1)
        return (after - before) / connected, connected, lateness, rest
    per_client, connected, lateness, rest = run_loop(measure())
    table.add("WebSocket clients (%d connected)" % connected, "%.1f KiB each" % per_client, "-", "-",
              "<= 6 KiB", per_client <= 6)
    table.add("tick fan-out at %d clients: p99 lateness" % timed, "%.0f ms" % percentile(lateness, 0.99),
              "first client: 0 ms", "-", "<= 250 ms", lateness and percentile(lateness, 0.99) <= 250)
    table.add("REST p99 meanwhile (%d requests)" % len(rest), "%.1f ms" % percentile(rest, 0.99), "-",
              "-", "<= 50 ms", percentile(rest, 0.99) <= 50)


def bench_cpu(daemon, table, seconds, rounds, wall=20):
    """Daemon CPU with 100 sleeping processes sampled every second, against a bare loop that
    only reads each one's /proc/PID/stat once a second."""
    for index in range(20, 100):
        daemon.start("bench-%d" % index, "sleep", ["600"])
    pids = [entry["pid"] for entry in daemon.get("/api/processes")[2]["processes"] if entry["pid"]]
    sampler = subprocess.Popen([PY, "-c", BASELINE_SAMPLER] + [str(pid) for pid in pids])
    time.sleep(2)                                # past the creation burst
    ours_before, theirs_before = cpu_seconds(daemon.proc.pid), cpu_seconds(sampler.pid)
    time.sleep(wall)
    ours = (cpu_seconds(daemon.proc.pid) - ours_before) / wall * 100
    theirs = (cpu_seconds(sampler.pid) - theirs_before) / wall * 100
    stop(sampler)
    table.add("daemon CPU, %d sleeping procs, %d s" % (len(pids), wall), "%.2f%% of a core" % ours,
              "%.2f%% (bare /proc reads)" % theirs, "%.1fx" % (ours / theirs if theirs else float("inf")),
              "<= 0.5%", ours <= 0.5)


def bench_logs(daemon, table, seconds, rounds, count=20):
    """GET /api/logs/NAME?lines=100 on a 1 GB log, against the same request on a 1 MB log."""
    timings = {}
    for name, size in (("bench-log-small", 1 << 20), ("bench-log-big", 1 << 30)):
        daemon.start(name, "sleep", ["600"])
        line = b"2026-11-30T00:00:00.000Z a line of output that a busy service might write, numbered %08d\n"
        block = b"".join(line % index for index in range(8192))
        with open(os.path.join(daemon.home, "logs", "%s-out.log" % name), "ab") as handle:
            for _ in range(max(1, size // len(block))):
                handle.write(block)
        times = []
        path = "/api/logs/%s?lines=100&type=stdout" % name
        for _ in range(count):
            started = time.perf_counter()
            status, _, body = daemon.get(path)
            times.append((time.perf_counter() - started) * 1000)
            assert status == 200 and len(body["logs"]) == 100, (status, body)
        timings[name] = median(times)
        daemon.request("DELETE", "/api/processes/%s" % name)
    big, small = timings["bench-log-big"], timings["bench-log-small"]
    table.add("last 100 lines of a 1 GB log (median of %d)" % count, "%.1f ms" % big, "%.1f ms (1 MB log)" % small,
              "%.2fx" % (big / small), "<= 5 ms, size-independent", big <= 5)


def run_ws_load(count=10000):
    """`ws-load N`: the WebSocket rows of the bench alone, with N clients."""
    table = BenchTable()
    daemon = Daemon(args=("--sample-interval", "1", "--quiet"))   # stderr is a pipe nobody reads
    try:
        for index in range(20):
            daemon.start("bench-%d" % index, "sleep", ["600"])
        bench_ws(daemon, table, 0, 0, count=count, timed=min(1000, count))
    finally:
        daemon.terminate()
        daemon.cleanup()
    print("\n" + table.render())


def run_scale_bench(sizes=(10, 100, 1000, 5000)):
    """`bench scale [N...]`: what one operation costs with N managed processes, each row beside
    the smallest N of the same run: create and delete (each, on one keep-alive connection, as
    a script would), restart, kill -9 -> new pid, GET /api/processes, idle CPU, daemon RSS per
    process, and WebSocket bytes per tick for 100 clients."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print("pmdaemon bench scale, %s, Python %s, %d cores, %s" % (time.strftime("%Y-%m-%d %H:%M"),
          sys.version.split()[0], os.cpu_count(), os.uname().release), flush=True)
    rows = {}
    for count in sizes:
        rows[count] = scale_row(count)
        print("  N=%d: %s" % (count, ", ".join("%s %s" % item for item in rows[count].items())), flush=True)
    names = list(rows[sizes[0]])
    print("\n| measure | " + " | ".join("N = %d" % count for count in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for name in names:
        base = rows[sizes[0]][name]
        cells = ["%.3g%s" % (rows[count][name], "" if count == sizes[0] or not base else
                             " (%.1fx)" % (rows[count][name] / base)) for count in sizes]
        print("| %s | %s |" % (name, " | ".join(cells)))
    print("\nreproduce: python3 test_pmdaemon.py bench scale %s" % " ".join(str(count) for count in sizes))
    return 0


# The least any sampler does: wake each second, read the system's figures (what the daemon's
# idle CPU is set beside in `bench scale`).
BARE_SAMPLER = """import asyncio, os
async def sample():
    while True:
        for name in ("/proc/stat", "/proc/meminfo", "/proc/uptime"):
            with open(name, "rb") as handle:
                handle.read()
        os.getloadavg()
        await asyncio.sleep(1)
asyncio.get_event_loop().run_until_complete(sample())
"""


def scale_row(count, clients=100):
    daemon = Daemon(args=("--sample-interval", "1", "--quiet"))
    try:
        rss_before = rss_kib(daemon.proc.pid)
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=60) as sock:
            def call(method, path, body=None):
                data = json.dumps(body).encode() if body is not None else b""
                sock.sendall(b"%s %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (method.encode(), path.encode(), len(data), data))
                answer = read_one_response(sock)
                return status_of(answer), answer

            def timed(method, path, body=None):
                started = time.perf_counter()
                status, _ = call(method, path, body)
                assert status < 300, (method, path, status)
                return (time.perf_counter() - started) * 1000
            creates = [timed("POST", "/api/processes", {"name": "s%d" % index, "script": "sleep", "args": ["3600"]})
                       for index in range(count)]
            call("POST", "/api/processes", {"name": "probe", "script": "sleep", "args": ["3600"], "min_uptime": 0,
                                            "max_restarts": 1000000})
            listing = [timed("GET", "/api/processes") for _ in range(20)]
            restarts = [timed("POST", "/api/processes/s0/restart") for _ in range(10)]
            kills = []
            for _ in range(10):
                pid = json_of(call("GET", "/api/processes/probe")[1])["pid"]
                started = time.perf_counter()
                os.kill(pid, signal.SIGKILL)
                wait_until(lambda: json_of(call("GET", "/api/processes/probe")[1])["pid"] not in (None, pid),
                           interval=0, message="the new pid")
                kills.append((time.perf_counter() - started) * 1000)
            rss_after = rss_kib(daemon.proc.pid)
            # Idle, once the kills' restarts have settled, beside the least a sampler does in
            # the same seconds: on a VM a wake-up with cold caches costs milliseconds.
            bare = subprocess.Popen([PY, "-c", BARE_SAMPLER])
            try:
                time.sleep(5)
                cpu_start, bare_start, wall_start = cpu_seconds(daemon.proc.pid), cpu_seconds(bare.pid), time.monotonic()
                time.sleep(10)
                wall = time.monotonic() - wall_start
                idle_cpu = (cpu_seconds(daemon.proc.pid) - cpu_start) / wall * 100
                bare_cpu = (cpu_seconds(bare.pid) - bare_start) / wall * 100
            finally:
                bare.kill()
                bare.wait()
            watchers = [WsClient(daemon.port) for _ in range(clients)]
            try:
                received, ticks = 0, 0
                for _ in range(3):                  # past the state on connect and the first ticks
                    watchers[0].recv_message("system_update")
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    event = watchers[0].recv()
                    payload = event.data.encode("utf-8") if isinstance(event.data, str) else b""
                    received += len(payload)
                    ticks += b'"system_update"' in payload
            finally:
                for watcher in watchers:
                    watcher.close()
            deletes = [timed("DELETE", "/api/processes/s%d" % index) for index in range(count)]
        return {"create ms": median(creates), "delete ms": median(deletes), "restart ms": median(restarts),
                "kill -9 -> new pid ms": median(kills), "GET /api/processes ms": median(listing),
                "idle CPU %": idle_cpu, "idle CPU of a bare sampler %": bare_cpu,
                "RSS KiB per process": (rss_after - rss_before) / (count + 1),
                "WS KiB per tick, %d clients" % clients: received * clients / max(ticks, 1) / 1024}
    finally:
        daemon.terminate(timeout=600)
        daemon.cleanup()


UPGRADE_BENCH_APPS, UPGRADE_BENCH_WS_CLIENTS, UPGRADE_BENCH_HAMMERS = 20, 200, 4
# About 1000 lines a second each, in bursts of 10.
UPGRADE_BENCH_COUNTER = "import sys, time\nfor n in range(10 ** 9):\n    print('line-%d' % n, flush=True)\n    if n % 10 == 0: time.sleep(0.01)\n"


def run_upgrade_bench(upgrades=5):
    """`bench upgrade [N]`: how long the API is unavailable while `pmdaemon.py upgrade` replaces
    the daemon in place. A daemon from a copy of pmdaemon.py; 20 apps writing numbered lines as
    fast as they can; 200 WebSocket clients; 4 threads doing GET /api/processes without pause (a
    new connection each); then N upgrades. Reported: per upgrade, the longest time no GET was
    answered; connections refused; answers that were not 200; the WebSocket close codes; whether
    every app kept its pid and every log line is there once and whole."""
    import selectors
    import threading
    directory = tempfile.mkdtemp(prefix="pmd-bench-")
    script = os.path.join(directory, "pmdaemon.py")
    shutil.copy(PMDAEMON, script)
    with open(os.path.join(directory, "counter.py"), "w") as handle:
        handle.write(UPGRADE_BENCH_COUNTER)
    daemon = Daemon(script=script, args=("--quiet", "--max-ws-clients", "1000"))
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
                    answers.append((time.monotonic(), status_of(recv_all(sock, 10))))
            except ConnectionRefusedError:
                refused.append(time.monotonic())
            except OSError as exc:
                answers.append((time.monotonic(), repr(exc)))
    try:
        names = ["bench-%d" % index for index in range(UPGRADE_BENCH_APPS)]
        for name in names:
            daemon.start(name, sys.executable, [os.path.join(directory, "counter.py")])
        pids = {name: daemon.wait_status(name, "online")["pid"] for name in names}
        threads = [threading.Thread(target=hammer) for _ in range(UPGRADE_BENCH_HAMMERS)]
        for thread in threads:
            thread.start()
        time.sleep(1)
        gaps = []
        for _ in range(upgrades):
            reader = threading.Thread(target=read_websockets, args=([WsClient(daemon.port) for _ in range(UPGRADE_BENCH_WS_CLIENTS)],))
            reader.start()
            time.sleep(0.5)
            began = time.monotonic()
            result = subprocess.run([sys.executable, PMDAEMON, "upgrade"], stdout=subprocess.PIPE,
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
              % (sys.version.split()[0], UPGRADE_BENCH_APPS, UPGRADE_BENCH_WS_CLIENTS, UPGRADE_BENCH_HAMMERS, upgrades))
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


# ----------------------------------------------------------------------------------------------
# `python3 test_pmdaemon.py browser [SCREENSHOT.png]`: the dashboard in headless Chromium
# ----------------------------------------------------------------------------------------------

def run_browser_check(screenshot=None):
    """Load the dashboard in real browsers and check what it rendered (outside the unittest
    suite, which must run on a bare machine): headless Chromium (--dump-dom) and Firefox
    (driven over its Marionette protocol, no driver needed)."""
    chromium = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                     if shutil.which(name)), None)
    firefox = shutil.which("firefox-esr") or shutil.which("firefox")
    if not chromium and not firefox:
        print("browser: neither chromium nor firefox found (apt-get install chromium firefox-esr)")
        return 2
    daemon = Daemon()
    results = {}
    try:
        daemon.start("browser-demo", "sh", ["-c", "echo hello from the dashboard check; exec sleep 60"], port=3990)
        url = "http://127.0.0.1:%d/" % daemon.port
        if chromium:
            results["chromium"] = chromium_check(chromium, url, screenshot)
        if firefox:
            results["firefox"] = firefox_check(firefox, url)
    finally:
        daemon.terminate()
        daemon.cleanup()
    for browser, checks in results.items():
        for what, ok in checks.items():
            print("browser: %-8s %-18s %s" % (browser, what, "ok" if ok else "MISSING"))
    return 0 if all(all(checks.values()) for checks in results.values()) else 1


def chromium_check(chromium, url, screenshot):
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=4000",
             "--window-size=360,900"]
    dom = subprocess.run(flags + ["--dump-dom", url], **CAPTURE, universal_newlines=True, timeout=60).stdout
    if screenshot:
        subprocess.run(flags + ["--screenshot=" + screenshot, url], **CAPTURE, timeout=60)
    return {"the process row": "<td>browser-demo</td>" in dom,
            "its status": '<td class="online">online</td>' in dom,
            "the live badge": 'id="connection" class="badge" role="status">live<' in dom,
            "the access badge": ">local user<" in dom,
            "system figures": re.search(r'id="sys-cpu">[0-9.]+%<', dom) is not None}


def firefox_check(firefox, url):
    profile = tempfile.mkdtemp(prefix="pmd-firefox-")
    browser = subprocess.Popen([firefox, "--headless", "--marionette", "--no-remote", "--profile", profile],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, HOME=profile))
    try:
        sock = wait_until(lambda: _connect_or_none(("127.0.0.1", 2828)), 30, 0.2, "Firefox's Marionette port")
        channel = {"buffer": b"", "id": 0}

        def receive():
            while b":" not in channel["buffer"]:
                channel["buffer"] += sock.recv(65536)
            size, _, rest = channel["buffer"].partition(b":")
            while len(rest) < int(size):
                rest += sock.recv(65536)
            channel["buffer"] = rest[int(size):]
            return json.loads(rest[:int(size)])

        def command(name, parameters):
            channel["id"] += 1
            data = json.dumps([0, channel["id"], name, parameters]).encode()
            sock.sendall(b"%d:%s" % (len(data), data))
            return receive()
        receive()                                     # the greeting
        command("WebDriver:NewSession", {"capabilities": {}})
        command("WebDriver:Navigate", {"url": url})
        script = ("return [document.getElementById('connection').textContent, "
                  "document.getElementById('processes').textContent, document.getElementById('access').textContent]")
        seen = wait_until(lambda: (lambda value: value if value and value[0] == "live" and "browser-demo" in value[1]
                                   else None)(command("WebDriver:ExecuteScript", {"script": script, "args": []})[3]["value"]),
                          20, 0.1, "the dashboard in Firefox")
        sock.close()
        return {"the process row": "browser-demo" in seen[1], "its status": "online" in seen[1],
                "the live badge": seen[0] == "live", "the access badge": seen[2] == "local user"}
    finally:
        browser.kill()
        browser.wait()
        shutil.rmtree(profile, ignore_errors=True)


def _connect_or_none(address):
    try:
        return socket.create_connection(address, timeout=10)
    except OSError:
        return None


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "browser":
        sys.exit(run_browser_check(*sys.argv[2:3]))
    elif len(sys.argv) == 3 and sys.argv[1] == "ws-echo":
        run_echo_server(int(sys.argv[2]))
    elif len(sys.argv) >= 2 and sys.argv[1] == "ws-load":
        run_ws_load(*[int(value) for value in sys.argv[2:3]])
    elif len(sys.argv) >= 3 and sys.argv[1:3] == ["bench", "upgrade"]:
        run_upgrade_bench(*[int(value) for value in sys.argv[3:4]])
    elif len(sys.argv) >= 3 and sys.argv[1:3] == ["bench", "scale"]:
        sys.exit(run_scale_bench(*[tuple(int(value) for value in sys.argv[3:])] if sys.argv[3:] else ()))
    elif len(sys.argv) >= 2 and sys.argv[1] == "bench":
        numbers = [int(value) for value in sys.argv[2:] if value.isdigit()]
        sys.exit(run_benchmark(*numbers[:2], only=[value for value in sys.argv[2:] if not value.isdigit()]))
    else:
        unittest.main()

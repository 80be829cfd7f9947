#!/usr/bin/env python3
"""pmdaemon.py: a process manager with a REST + WebSocket API, in one standard-library file.

Usage:
    python3 pmdaemon.py web [--host 127.0.0.1] [--port 9615] [--daemonize]    # the daemon
    python3 pmdaemon.py start | stop | restart | reload | delete | scale | ls | info | system
                        | logs | flush | monit | apply | save | resurrect | startup | signal | send
                        | describe | convert
    python3 pmdaemon.py kill | upgrade [--web OPTIONS]    # stop the daemon; replace it in place
    python3 pmdaemon.py --help | --version

The daemon supervises child processes (restart policies with backoff, process-group stops that
leave nothing behind, memory limits, health checks, instances and ports, rolling reload, start
order, rotating logs, metrics) and serves the PMDaemon Web API: REST under /api, WebSocket at
/ws, on a port and on a Unix socket in $PMDAEMON_HOME (default ~/.pmdaemon), which also holds
the state and logs. The other commands are a client of the daemon (they start one when none
runs). README.md documents every endpoint, setting, command and choice.

Map of this file; each section uses only the sections above it:
     1. Constants and enums    limits, defaults, process states, WebSocket opcodes and states;
                               what Python 3.6 lacks (record for dataclasses, current_task, ...)
     2. Errors                 PMDaemonError; domain errors (ProcessNotFound, CannotStart, ...);
                               HttpError, WebSocketError and WsCommandError, with their wire form
     3. Configuration          CONFIG_FIELDS, the one table of process settings, which makes
                               ProcessConfig, its parsing and its schema; DaemonConfig
     4. Metrics                /proc parsers; Sampler (CPU % between samples, degrades, never raises)
     5. Logs                   LogFile (rotation, tail, placed files through a held directory),
                               ProcessLogs, LogHub: the one subscription path for live lines;
                               OutputPump (a child's pipe read in the loop, to its log);
                               opening paths that someone else may influence
     6. Supervisor             restart policy (pure), ports, a child's environment, health checks,
                               stopping, watch, cgroups; PidfdWatcher (children's exits, one
                               pidfd each, lent to the run); Child (started or adopted, with no
                               subprocess transport) and Run; ProcessRunner, one per process,
                               the only code that changes its state (TRANSITIONS), seeing
                               the rest through its RunnerContext; Registry; StateStore and
                               StateJournal (synced before an answer); MetricsLoop (reads what
                               moves); Supervisor, the facade the API calls
     7. HTTP/1.1 codec         request parser (heads first, a body reader per request) and
                               response serialiser (no I/O)
     8. WebSocket codec        handshake (both sides), frames, messages, closing handshake (no I/O)
     9. API                    access rules, ERROR_WIRE_FORM and error_response, views, the
                               dashboard, the OpenAPI document, Prometheus metrics, the route table
                               (each row with its access and documentation) and its handlers
    10. Server glue            the only code touching sockets: who connected (the kernel's word),
                               HttpConnection (one per connection, one send()), RepeatedAnswers,
                               WsSession, the Broadcaster, HttpServer (TLS accepted by us)
    11. Daemon runtime         the home's checks, the lock, secrets wiped, the file limit, the
                               child watcher installed, the daemon's log, the code cache, systemd,
                               the options kept in the home, the upgrade in place (hand-over and
                               adoption), the Daemon and command_web (`web`), the daemon in the
                               background
    12. CLI                    the client (Client, the verbs, monit), PM2 and supervisord files,
                               apply, argument parsing and main

What happens when a child exits: the child watcher reaps it and completes Child.exited, whose
callback starts the run's exit task (ProcessRunner._after_exit; none waits while it runs). The
task stops what the run left behind (terminate_run), then calls ProcessRunner._on_exit(run,
code), which ignores a stale run and asks decide_after_exit (pure) whether to restart (a timer
through its RunnerContext), stop or give up (change_state). Every call goes outward: runner
-> context -> Supervisor._announce -> listeners (store, broadcaster).
"""

import argparse
import base64
import codecs
import contextlib
import copy
import enum
import errno
import fcntl
import functools
import hashlib
import hmac
import importlib.util
import ipaddress
import json
import logging
import marshal
import math
import os
import re
import select
import shlex
import shutil
import signal
import socket
import stat as stat_module
import struct
import subprocess
import sys
import time
import urllib.parse
import warnings
import zlib
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

__version__: str = "0.1.0"      # needs Python 3.6 or newer (the first line older ones cannot read)


def lazy_module(name: str):
    """A module loaded on its first use (importlib.util.LazyLoader): the CLI's commands never
    touch asyncio, and importing it is a third of their start-up."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


asyncio = lazy_module("asyncio")
datetime = lazy_module("datetime")      # only cron_restart needs it (0.3 MiB the daemon need not hold)

log = logging.getLogger("pmdaemon")


# ==============================================================================================
# 1. Constants and enums
#    Every limit and default lives here, named, so that code and README cite the same number.
#    Nothing in this section does anything, but for the few stand-ins for what Python 3.6 lacks.
# ==============================================================================================

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9615
DEFAULT_HOME = "~/.pmdaemon"
HOME_ENV = "PMDAEMON_HOME"
API_KEY_ENV = "PMDAEMON_API_KEY"
URL_ENV = "PMDAEMON_URL"
PORT_ENV = "PMDAEMON_PORT"
# Variables of the daemon's own environment that never reach a child.
SECRET_ENV_NAMES = frozenset({API_KEY_ENV})
# Files are opened without following a link where the platform allows it.
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
SO_PEERCRED = getattr(socket, "SO_PEERCRED", 17)   # Linux: struct ucred of a Unix socket peer
PR_SET_DUMPABLE = 4                    # prctl(2): not dumpable, /proc/PID/* not readable by peers
SOCKET_NAME = "pmdaemon.sock"          # the API on a Unix socket in the home, mode 0600
CODE_CACHE_NAME = "pmdaemon.pyc"       # the daemon's own code, compiled once (run_from_code_cache)
OPTIONS_NAME = "daemon.json"           # the `web` options the home's daemon last ran with (never a key)
# Set in every child, inherited by everything it starts: how stop finds double-forked escapees.
RUN_ID_ENV = "PMDAEMON_RUN_ID"
# An upgrade (exec in place): the new image finds what it inherits in UPGRADE_INVENTORY_NAME,
# named by a nonce in this variable, which it reads and removes before anything starts.
UPGRADE_ENV = "PMDAEMON_UPGRADE"
UPGRADE_INVENTORY_NAME = "upgrade.json"        # descriptors handed over: listeners, pipes, pidfds
UPGRADE_REQUEST_NAME = "upgrade-request.json"  # what `upgrade` asks for (new web options)
UPGRADE_RESULT_NAME = "upgrade-result.json"    # the answer: refused with the reason, or done
UPGRADE_DRAIN_TIMEOUT = 5.0            # seconds requests in flight may take to finish before the exec
UPGRADE_GRACE = 0.2                    # seconds a new connection has to send its request then, and
                                       # a WebSocket to take its close frame
UPGRADE_WAIT_TIMEOUT = 60              # seconds `upgrade` waits for the daemon to serve again

# HTTP/1.1 limits (RFC 9112 leaves them to the server; each maps to its own status).
MAX_REQUEST_LINE = 8 * 1024            # request line longer than this -> 414
MAX_HEADER_BYTES = 16 * 1024           # whole header block -> 431
MAX_HEADER_COUNT = 100                 # header fields -> 431
MAX_BODY_BYTES = 1024 * 1024           # request body, declared or chunked -> 413
MAX_BODY_MEMORY = 64 * 1024 * 1024     # all bodies being received at once, daemon-wide -> 503
MAX_CHUNK_LINE = 1024                  # chunk-size line with extensions -> 400
MAX_BODY_CHUNKS = 1024                 # chunks in one chunked body -> 413 (bounds work per byte)
READ_CHUNK = 64 * 1024                 # bytes asked of the socket per read
PLAN_KEEP_BYTES = 64 * 1024            # a repeated answer larger than this is rendered anew each time
HEADER_TIMEOUT = 10.0                  # seconds for a whole header block, from its first byte
BODY_TIMEOUT = 30.0                    # seconds for a whole body, from the end of its header
KEEPALIVE_TIMEOUT = 30.0               # seconds an idle keep-alive connection is kept
WRITE_TIMEOUT = 30.0                   # seconds a client may take to accept our pending output
LINGER_SECONDS = 1.0                   # after a refusal: how long unread input is discarded ...
LINGER_BYTES = 256 * 1024              # ... and how much of it, before the connection is closed
DEADLINE_SWEEP_INTERVAL = 0.25        # the sweeper's finest step: a passed deadline is acted on within it
WRITE_BUFFER_HIGH = 256 * 1024         # pending output above which we wait for the client
MAX_CONNECTIONS = 12_000               # HTTP + WebSocket connections at once
MAX_TLS_HANDSHAKES = 64                # TLS handshakes under way at once (each holds ~256 KiB)
ACCEPT_RETRY_DELAY = 0.1               # seconds before accepting again after accept() failed
ACCEPT_EPISODE_GAP = 60.0              # seconds without accept errors before another is logged
MAX_LOG_REQUEST_LINES = 10_000         # upper bound of ?lines=
MAX_JSON_DEPTH = 32                    # nesting of a client's JSON (REST body, WebSocket command)
FOLLOW_QUEUE_LINES = 10_000            # lines a ?follow=true stream may lag before it is ended

# The command line.
CLI_TIMEOUT = 30.0                     # seconds for answers that should be quick (list, info)
NODE_TIMEOUT = 20                      # seconds node may take to evaluate an ecosystem .js file
MAX_ORIGIN = 4096                      # characters of a process's origin (the file that created it)
ACTION_TIMEOUT = 3600.0                # ... and for actions, which wait for kill_timeout and more
BACKGROUND_START_TIMEOUT = 10          # seconds a daemon started in the background may take
KILL_WAIT_TIMEOUT = 300                # seconds `kill` waits for the daemon to stop its processes
DUMP_NAME = "dump.json"                # `save` / `resurrect` default file, in the home
MONIT_LOG_LINES = 200                  # lines of the selected process that monit keeps
MONIT_WIDTHS = (4, 20, 10, 7, 5, 6, 7, 7, 8)    # columns of monit's table

# Supervision defaults (milliseconds where the API speaks milliseconds).
DEFAULT_KILL_TIMEOUT_MS = 1600
DEFAULT_MAX_RESTARTS = 16
DEFAULT_MIN_UPTIME_MS = 1000
DEFAULT_RESTART_DELAY_MS = 0
BACKOFF_FACTOR = 1.5
BACKOFF_MAX_MS = 15_000
BACKOFF_RESET_UPTIME_MS = 30_000
SAMPLE_INTERVAL = 1.0                  # seconds between metric samples
SCAN_FULL_EVERY = 30                   # every Nth /proc scan re-reads every process, not just new ones
SCAN_REUSE_WINDOW = 0.01               # seconds a listing of /proc serves the next step of the same stop
LISTING_EVERY = 5                      # metric ticks between listings of /proc (new members of a tree)
ROLL_EVERY = 150                       # ticks between whole rolls of who runs (MetricsLoop; else by change)
QUIET_AFTER, QUIET_EVERY = 3, 10       # a tree idle for 3 reads is re-read every 10th tick (MetricsLoop),
QUIET_READS_PER_TICK = 40              # ... or less often, down to every QUIET_EVERY_MAX-th, to read
QUIET_EVERY_MAX = 30                   # no more than 40 quiet trees a tick (PM2 checks memory every 30 s)
TRACED_REAP_RETRY = 1.0                # seconds between tries to reap an exited child that is ptraced
MAX_HELD_STAT_FILES = 1024             # /proc/PID/stat kept open for the processes sampled every tick
FDS_PER_PROCESS = 8                    # descriptors a managed process may hold: pipes, pidfd, logs, stat
FD_RESERVE = 16                        # descriptors kept for connections, the state and the logs
DEFAULT_LISTEN_TIMEOUT_MS = 10_000     # wait_ready: longest wait for the first healthy check
HEALTH_STARTING_INTERVAL = 0.25        # seconds between checks while waiting to be ready
MAX_HEALTH_RESPONSE_LINE = 8192
HEALTH_OUTPUT_TAIL = 4 * 1024          # bytes of a check script's stderr kept (its last ones)
HEALTH_ERROR_CHARS = 200               # ... of which a failed check's error shows at most this
STOP_POLL_INTERVAL = 0.02              # seconds between checks that a stopped group is gone
KILL_GRACE = 5.0                       # seconds SIGKILLed processes get to disappear
EXIT_OUTPUT_GRACE = 0.5                # seconds the last output of an exited child may take
STATE_SAVE_INTERVAL = 1.0              # state.json: at most one write per this many seconds
STATE_LAZY_INTERVAL = 60.0             # ... and for runtime details alone (pid, restart counts)
LOG_ERROR_REPORT_INTERVAL = 10.0       # a process's log write errors are reported this seldom
MAX_INSTANCES = 64
MAX_PROCESSES = 10_000                 # managed processes (each holds ~8 descriptors)
MAX_ARGS = 1024
MAX_ENV_VARS = 1024
MAX_ENV_FILE_BYTES = 1024 * 1024
JOURNAL_MIN_COMPACT = 1024 * 1024      # the journal is folded into state.json past this (or its size)
WATCH_DELAY_MS = 1000                  # watch: quiet time after the last change before a restart
WATCH_POLL_INTERVAL = 0.5              # seconds between looks at the watched files
WATCH_MAX_FILES = 20_000               # files one process may watch (past it: watching stops)
WATCH_MAX_DIRS = 5_000                 # directories one process may watch (past it: watching stops)
WATCH_IGNORE_DEFAULT = ("node_modules", ".git", "__pycache__", "*.log", "*.pyc", ".*.swp")
MAX_STDIN_WRITE = 64 * 1024            # bytes one POST .../stdin may send
STDIN_WRITE_TIMEOUT = 5.0              # seconds a child may take to read what was written
STATE_FILE_VERSION = 1

# Logs.
DEFAULT_LOG_MAX_SIZE = 10 * 1024 * 1024
DEFAULT_LOG_MAX_FILES = 5
MAX_LOG_LINE = 16 * 1024               # longer output lines are split into pieces of this size
PARTIAL_LINE_FLUSH = 0.2               # seconds before an unterminated line is written anyway
TAIL_BLOCK = 64 * 1024
MAX_LOG_READ_BYTES = 8 * 1024 * 1024   # log text one GET /api/logs reads per stream at most
LOG_READERS = 4                        # log reads running at once (in threads, off the loop)

# WebSocket (RFC 6455).
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_WS_MESSAGE = 1024 * 1024           # reassembled message -> close 1009
MAX_WS_FRAGMENTS = 4096                # frames of one message (empty ones too) -> close 1008
MAX_WS_CONTROL_PAYLOAD = 125           # RFC 6455 §5.5
WS_PING_INTERVAL = 30.0
WS_PONG_TIMEOUT = 20.0
WS_CLOSE_TIMEOUT = 5.0
WS_SEND_BUFFER = 1024 * 1024           # pending bytes per client before updates are dropped
WS_KERNEL_SEND_BUFFER = 128 * 1024     # SO_SNDBUF of a WebSocket connection
WS_SLOW_GRACE = 10.0                   # seconds a client may stay over its buffer before 1008
WS_HARD_LIMIT = 4                      # x WS_SEND_BUFFER: closed at once (only events get there)
MAX_WS_CLIENTS = 10_000
FANOUT_CHUNK = 500                     # clients served per loop iteration when a tick fans out
FULL_STATE_INTERVAL = 30.0             # seconds between ticks that carry every process, changed or not
WS_TICKET_TTL = 30.0
MAX_WS_TICKETS = 1024                  # unused tickets of all read-only keys together -> 503
MAX_WS_TICKETS_PER_KEY = 256           # unused tickets of one key (the full key's are its own) -> 503
MASKED = "***"                         # what a read-only key sees for env values and URL credentials
MAX_WS_SUBSCRIPTIONS = 64


class ProcessState(str, enum.Enum):
    """What a managed process is doing; the value is what the API shows."""
    STARTING = "starting"
    ONLINE = "online"
    STOPPING = "stopping"
    STOPPED = "stopped"
    RESTARTING = "restarting"
    ERRORED = "errored"


RUNNING_STATES = frozenset({ProcessState.STARTING, ProcessState.ONLINE, ProcessState.STOPPING})


class Opcode(enum.IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA



class WsState(enum.Enum):
    """Where a WebSocket connection is in its closing handshake (RFC 6455 §7)."""
    OPEN = "open"
    CLOSE_SENT = "close_sent"           # we sent a close frame; the peer's is awaited
    CLOSE_RECEIVED = "close_received"   # the peer's close arrived; ours is not out yet
    CLOSED = "closed"                   # both sent: the TCP connection can go


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012              # the daemon replaces itself (upgrade): reconnect


# -- compatibility: Python 3.6 and newer --------------------------------------------------------
#    The oldest python3 of supported distributions (RHEL 8, SLES 15, Ubuntu 18.04) is 3.6. What
#    its standard library lacks (dataclasses, asyncio.current_task, ssl.TLSVersion, ...) is
#    provided here once, so that the code below reads the same on every version.

class RecordField:
    """A field default made anew for each record (an empty list, say), as record_field gives."""
    __slots__ = ("default_factory",)

    def __init__(self, default_factory: Callable[[], Any]):
        self.default_factory = default_factory


def record_field(default_factory: Callable[[], Any]) -> Any:
    return RecordField(default_factory)


def record(cls):
    """Make a class of annotated fields a plain record, as @dataclasses.dataclass(slots=True)
    (3.10+) does: __init__(fields in order, defaults or record_field factories), __repr__,
    __eq__, and a slot per field (no __dict__: a ProcessConfig is 45 fields, and a dict that
    large costs 1.5 KiB per process). Its methods must not use super() without arguments."""
    names = tuple(cls.__dict__.get("__annotations__", {}))
    defaults = {name: cls.__dict__[name] for name in names if name in cls.__dict__}
    namespace = {key: value for key, value in cls.__dict__.items()
                 if key not in defaults and key not in ("__dict__", "__weakref__")}
    cls = type(cls)(cls.__name__, cls.__bases__, dict(namespace, __slots__=names, __qualname__=cls.__qualname__))

    def __init__(self, *args, **kwargs):
        if len(args) > len(names):
            raise TypeError("%s() takes %d arguments, %d given" % (cls.__name__, len(names), len(args)))
        kwargs.update(zip(names, args))
        for name in names:
            if name in kwargs:
                value = kwargs.pop(name)
            elif name not in defaults:
                raise TypeError("%s() missing argument %r" % (cls.__name__, name))
            else:
                value = defaults[name]
                if isinstance(value, RecordField):
                    value = value.default_factory()
            setattr(self, name, value)
        if kwargs:
            raise TypeError("%s() got an unexpected argument %r" % (cls.__name__, next(iter(kwargs))))

    def __repr__(self):
        return "%s(%s)" % (cls.__qualname__, ", ".join("%s=%r" % (name, getattr(self, name)) for name in names))

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in names)

    cls.__init__, cls.__repr__, cls.__eq__, cls.__hash__ = __init__, __repr__, __eq__, None
    cls.record_fields = names
    return cls


def record_asdict(item) -> dict:
    """The fields of a record as a dict; lists and dicts in it are copies (dataclasses.asdict)."""
    return {name: copy.deepcopy(getattr(item, name)) for name in item.record_fields}


def record_replace(item, **changes):
    """A new record with the same fields but these (dataclasses.replace)."""
    values = {name: getattr(item, name) for name in item.record_fields}
    values.update(changes)
    return item.__class__(**values)


def current_task():
    """The task running this: asyncio.current_task() from 3.7, Task.current_task() before."""
    return asyncio.current_task() if hasattr(asyncio, "current_task") else asyncio.Task.current_task()  # novermin


def set_tls_floor(context) -> None:
    """Refuse TLS below 1.2. ssl.TLSVersion is 3.7+; the options that 3.6 has instead are
    deprecated (and warn) from 3.10, so each version gets the form it knows."""
    import ssl
    if hasattr(ssl, "TLSVersion"):
        context.minimum_version = ssl.TLSVersion.TLSv1_2     # novermin (3.7+: checked above)
    else:
        context.options |= ssl.OP_NO_SSLv2 | ssl.OP_NO_SSLv3 | ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1


def is_ascii_digits(text: str) -> bool:
    """0-9 only, at least one: str.isdigit() alone takes "²" and "٣", and str.isascii() is 3.7+."""
    return text.isdigit() and not text.strip("0123456789")


# ==============================================================================================
# 2. Errors
#    One root. Domain errors (below) say what went wrong in the words of processes and configs;
#    the API section maps each class to an HTTP status and code, once. HttpError is the wire
#    error of the HTTP codec and the API edge; WebSocketError carries its close code, and
#    WsCommandError the code of a WebSocket command that cannot be run.
# ==============================================================================================

class PMDaemonError(Exception):
    """Root of every error pmdaemon raises on purpose; .details is shown to API clients."""

    def __init__(self, message: str, details: Any = None):
        super().__init__(message)
        self.message = message
        self.details = details


class BadRequest(PMDaemonError):
    """The request as a whole is unusable (not JSON, not an object, a bad query)."""


class ValidationError(PMDaemonError):
    """One field of a request or config is wrong; names the field."""

    def __init__(self, field: str, message: str):
        super().__init__(message, {"field": field})
        self.field = field


class ProcessNotFound(PMDaemonError):
    def __init__(self, requested: str, available: List[str]):
        super().__init__("Process %r not found" % requested,
                         {"requested_process": requested, "available_processes": available})


class AlreadyExists(PMDaemonError):
    """A name (or a group member's name) is taken."""


class PortConflict(PMDaemonError):
    """A port a process wants is used by another managed process or by something else."""


class TooManyProcesses(PMDaemonError):
    pass


class OutOfDescriptors(PMDaemonError):
    """The daemon's file limit leaves no room for another process."""


class AlreadyRunning(PMDaemonError):
    pass


class NotRunning(PMDaemonError):
    """An action that needs a running process (a signal, stdin) found none."""


class StdinUnavailable(PMDaemonError):
    """stdin was not asked for, is closed, or is not being read."""


class StdinBusy(PMDaemonError):
    """An earlier write to the child's stdin has not been taken by the child yet."""


class CannotStart(PMDaemonError):
    """The program could not be executed; the process stays, errored, with the reason."""


class ReloadStopped(PMDaemonError):
    """A rolling reload stopped at a copy that did not become ready."""


class StateNotSaved(PMDaemonError):
    """The state file could not be written, so a change would not survive a restart."""


class HttpError(PMDaemonError):
    """An error with its wire form already decided; close=True when framing is unreliable."""

    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 headers: Tuple[Tuple[str, str], ...] = (), close: bool = False):
        super().__init__(message, details)
        self.status = status
        self.code = code
        self.headers = headers
        self.close = close
        self.request = None             # the head it concerns, when one was parsed (for CORS)


class WebSocketError(PMDaemonError):
    """A protocol violation by the peer; the session closes with close_code."""
    close_code = CloseCode.PROTOCOL_ERROR

    def __init__(self, message: str):
        super().__init__(message)


class InvalidUtf8(WebSocketError):
    close_code = CloseCode.INVALID_DATA


class MessageTooBig(WebSocketError):
    close_code = CloseCode.MESSAGE_TOO_BIG


class TooManyFragments(WebSocketError):
    close_code = CloseCode.POLICY_VIOLATION


class WsCommandError(PMDaemonError):
    """A WebSocket client's command that cannot be run: answered with an "error" message whose
    data carries .code, and the session stays open (no HTTP status: this is not a request)."""

    def __init__(self, message: str, code: str = "INVALID_COMMAND"):
        super().__init__(message)
        self.code = code


class UpgradeRefused(PMDaemonError):
    """An upgrade that would not work (the new file, its options); the daemon runs on as it was."""


class SpawnError(PMDaemonError):
    """A child could not be started; the message is shown to the user as the reason."""


# ==============================================================================================
# 3. Configuration
#    CONFIG_FIELDS, one row per process setting, makes ProcessConfig; from_dict validates user
#    input field by field with it and names the bad field; to_dict is both the API's "config"
#    and the persisted form. DaemonConfig holds `web` flags.
# ==============================================================================================

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z", re.ASCII)
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,255}\Z", re.ASCII)
SIZE_RE = re.compile(r"([0-9]{1,15}(?:\.[0-9]{1,6})?)\s*([KMG]?)B?\Z", re.ASCII | re.IGNORECASE)
PORT_RANGE_RE = re.compile(r"([0-9]{1,5})-([0-9]{1,5})\Z", re.ASCII)
SIZE_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}
DURATION_RE = re.compile(r"([0-9]{1,9}(?:\.[0-9]{1,3})?)\s*(ms|s|m)?\Z", re.ASCII)
DURATION_UNITS = {"ms": 1, "s": 1000, "m": 60_000}
HEALTH_CHECK_TYPES = ("http", "tcp", "script")
HEALTH_CHECK_DEFAULTS = {"type": None, "url": None, "host": "127.0.0.1", "port": None, "script": None,
                         "args": [], "timeout": 5000, "interval": 10_000, "retries": 3, "enabled": True}
KILL_SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGKILL")
MAX_LIST_ITEMS = 256            # stop_exit_codes, watch, watch_ignore
MAX_SIZE = 2 ** 50              # bytes a size setting may say
MAX_DURATION_MS = 86_400_000    # a duration setting without a tighter bound of its own
MAX_ID = 2 ** 31                # a uid or gid given as a number


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def invalid_field(field: str, message: str) -> ValidationError:
    return ValidationError(field, message)


def _check_str(field: str, value: Any, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise invalid_field(field, "field %r must be a string, got %s" % (field, _json_type(value)))
    if not allow_empty and not value:
        raise invalid_field(field, "field %r must not be empty" % field)
    if "\x00" in value:
        raise invalid_field(field, "field %r must not contain NUL" % field)
    return value


def _check_int(field: str, value: Any, low: int, high: int) -> int:
    if not _is_int(value):
        raise invalid_field(field, "field %r must be an integer, got %s" % (field, _json_type(value)))
    if not low <= value <= high:
        raise invalid_field(field, "field %r must be between %d and %d, got %d"
                            % (field, low, high, value))
    return value


def _check_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise invalid_field(field, "field %r must be true or false, got %s" % (field, _json_type(value)))
    return value


def _json_type(value: Any) -> str:
    """Name a JSON value's type the way a user of the API would."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number %s" % json.dumps(value)
    if isinstance(value, str):
        return "string %s" % json.dumps(value[:64])
    return {list: "array", dict: "object"}.get(type(value), type(value).__name__)


# What a terminal would obey in child output: C0 controls but tab, DEL, C1 (with CSI), ESC.
TERMINAL_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
CONTROL_CHARS_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def log_safe(text: str, limit: int = 200) -> str:
    """Client or child text for the daemon's log: control characters escaped, length bounded,
    so a name with a newline cannot forge a log line."""
    text = text[:limit]
    return CONTROL_CHARS_RE.sub(lambda match: "\\x%02x" % ord(match.group()), text) if CONTROL_CHARS_RE.search(text) else text


# Only a \uD800-\uDFFF escape can put a surrogate into decoded JSON (UTF-8 cannot carry one);
# a pair becomes one character, so a surrogate left after decoding is a lone one, which no
# response could encode: refused for every body and WebSocket command (parse_json_text) and
# every saved config, before any field is looked at.
SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89a-fA-F]")
SURROGATE_RE = re.compile("[\ud800-\udfff]")


def check_no_surrogates(value: Any) -> None:
    """ValidationError naming a string (key or value) that holds a lone surrogate."""
    pending = [("", value)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, str) and SURROGATE_RE.search(item):
            raise invalid_field(path, "field %r must be Unicode text, got %r" % (path, item[:64]))
        children = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        for key, child in children:
            name = key if isinstance(key, int) else key.encode("utf-8", "backslashreplace").decode("utf-8")
            child_path = "%s[%d]" % (path, name) if isinstance(name, int) else "%s.%s" % (path, name) if path else name
            if isinstance(key, str) and SURROGATE_RE.search(key):
                raise invalid_field(child_path, "field %r must be Unicode text, got %r" % (child_path, key[:64]))
            pending.append((child_path, child))


def parse_name(value: Any) -> str:
    name = _check_str("name", value)
    if not NAME_RE.match(name):
        raise invalid_field("name", "field 'name' must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}, got %r"
                            % name[:80])
    return name


def parse_args(value: Any) -> List[str]:
    if not isinstance(value, list) or len(value) > MAX_ARGS:
        raise invalid_field("args", "field 'args' must be an array of at most %d strings, got %s"
                            % (MAX_ARGS, _json_type(value)))
    return [_check_str("args", item, allow_empty=True) for item in value]


def parse_env(value: Any) -> Dict[str, str]:
    if not isinstance(value, dict) or len(value) > MAX_ENV_VARS:
        raise invalid_field("env", "field 'env' must be an object of at most %d strings, got %s"
                            % (MAX_ENV_VARS, _json_type(value)))
    env = {}
    for key, item in value.items():
        if not ENV_NAME_RE.match(key):
            raise invalid_field("env", "field 'env' has an invalid variable name %r" % key[:80])
        if not isinstance(item, str) or "\x00" in item:
            raise invalid_field("env", "field 'env' value of %r must be a string, got %s"
                                % (key, _json_type(item)))
        env[key] = item
    return env


def parse_port_value(field: str, value: Any) -> Optional[str]:
    """Accept a port as a number, a numeric string, a range "3000-3003", "auto" or "auto:A-B".

    The result is a normalised string ("3000", "3000-3003", "auto", "auto:3000-3100") or None.
    """
    if value is None:
        return None
    if _is_int(value):
        return str(_check_int(field, value, 1, 65535))
    if not isinstance(value, str):
        raise invalid_field(field, "field %r must be a port number or string, got %s"
                            % (field, _json_type(value)))
    text = value.strip()
    if text == "auto":
        return text
    auto = text.startswith("auto:")
    spec = text[5:] if auto else text
    match = PORT_RANGE_RE.match(spec)
    if match:
        low, high = int(match.group(1)), int(match.group(2))
    elif spec.isdigit() and len(spec) <= 5:
        low = high = int(spec)
    else:
        low, high = 0, -1
    if not 1 <= low <= high <= 65535:
        raise invalid_field(field, "field %r must be a port (1-65535), a range like \"3000-3003\", "
                            "\"auto\" or \"auto:3000-3100\", got %r" % (field, value))
    if auto:
        return "auto:%d-%d" % (low, high)
    return str(low) if not match else "%d-%d" % (low, high)


def parse_size(field: str, value: Any) -> Optional[int]:
    """Accept bytes as an integer or a string like "150M", "1G", "512K"."""
    if value is None:
        return None
    if _is_int(value):
        return _check_int(field, value, 1, MAX_SIZE)
    if isinstance(value, str):
        match = SIZE_RE.match(value.strip())
        size = int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()]) if match else 0
        if 0 < size <= MAX_SIZE:
            return size
    raise invalid_field(field, "field %r must be a size in bytes or like \"150M\" or \"1.5G\", got %s"
                        % (field, _json_type(value)))


def parse_duration(field: str, value: Any, high: int = MAX_DURATION_MS) -> int:
    """Milliseconds from an integer (ms) or a string like "500ms", "5s", "2m"."""
    if isinstance(value, str):
        match = DURATION_RE.match(value.strip())
        if match:
            value = int(float(match.group(1)) * DURATION_UNITS[match.group(2) or "ms"])
        else:
            raise invalid_field(field, "field %r must be milliseconds or a duration like \"5s\", "
                                "got %r" % (field, value[:40]))
    return _check_int(field, value, 0, high)


def parse_names(field: str, value: Any) -> List[str]:
    if not isinstance(value, list) or len(value) > MAX_PROCESSES:
        raise invalid_field(field, "field %r must be an array of process names, got %s"
                            % (field, _json_type(value)))
    names = []
    for item in value:
        if not isinstance(item, str) or not NAME_RE.match(item):
            raise invalid_field(field, "field %r must hold process names, got %s" % (field, _json_type(item)))
        names.append(item)
    return names


def parse_health_check(value: Any) -> Optional[dict]:
    """Validate a health_check object; the result has every key, with defaults filled in."""
    field = "health_check"
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid_field(field, "field 'health_check' must be an object, got %s" % _json_type(value))
    unknown = [key for key in value if key not in HEALTH_CHECK_DEFAULTS]
    if unknown:
        raise invalid_field(field, "unknown health_check field %r" % unknown[0][:40])
    check = dict(HEALTH_CHECK_DEFAULTS)
    check.update({key: item for key, item in value.items() if item is not None})
    if check["type"] not in HEALTH_CHECK_TYPES:
        raise invalid_field(field, "health_check 'type' must be one of http, tcp, script, got %r"
                            % (check["type"],))
    check["timeout"] = parse_duration("health_check.timeout", check["timeout"], 600_000) or 1
    check["interval"] = max(100, parse_duration("health_check.interval", check["interval"]))
    check["retries"] = _check_int("health_check.retries", check["retries"], 1, 1000)
    check["enabled"] = _check_bool("health_check.enabled", check["enabled"])
    check["host"] = _check_str("health_check.host", check["host"])
    if check["port"] is not None:
        check["port"] = _check_int("health_check.port", check["port"], 1, 65535)
    check["args"] = parse_args(check["args"])
    if check["type"] == "http":
        url = _check_str("health_check.url", check["url"] or "")
        parts = urllib.parse.urlsplit(url.replace("{port}", "1"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise invalid_field(field, "health_check 'url' must be an http:// or https:// URL, got %r" % url[:100])
    if check["type"] == "script":
        _check_str("health_check.script", check["script"] or "")
    return check


def parse_exit_codes(value: Any) -> List[int]:
    if not isinstance(value, list) or len(value) > MAX_LIST_ITEMS:
        raise invalid_field("stop_exit_codes", "field 'stop_exit_codes' must be an array of "
                            "exit codes, got %s" % _json_type(value))
    return [_check_int("stop_exit_codes", code, 0, 255) for code in value]


def parse_any_signal(value: Any) -> int:
    """A signal by name ("SIGUSR1", "usr1") or number, for POST .../signal."""
    try:
        if _is_int(value):
            return signal.Signals(value).value
        name = _check_str("signal", value).upper()
        return signal.Signals[name if name.startswith("SIG") else "SIG" + name].value
    except (KeyError, ValueError):
        raise invalid_field("signal", "field 'signal' must be a signal name like \"SIGUSR1\" or its number, "
                            "got %s" % _json_type(value)) from None


def parse_signal_name(value: Any) -> str:
    name = _check_str("kill_signal", value).upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    if name not in KILL_SIGNALS:
        raise invalid_field("kill_signal", "field 'kill_signal' must be one of %s, got %r"
                            % (", ".join(KILL_SIGNALS), value))
    return name


RLIMIT_NAMES = ("as", "core", "cpu", "data", "fsize", "memlock", "nofile", "nproc", "rss", "stack")
NAMESPACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z", re.ASCII)


def parse_umask(value: Any) -> Optional[int]:
    """An umask as an octal string ("022") or a number from 0 to 0o777."""
    if value is None:
        return None
    if isinstance(value, str) and re.match(r"0?[0-7]{1,3}\Z", value.strip()):
        value = int(value.strip(), 8)
    if not _is_int(value) or not 0 <= value <= 0o777:
        raise invalid_field("umask", "field 'umask' must be octal like \"022\" (0 to 777), got %s" % _json_type(value))
    return value


def parse_rlimits(value: Any) -> Dict[str, List[int]]:
    """{"nofile": 4096, "core": 0, "nproc": [256, 512]}: soft (= hard) or [soft, hard]; -1 = unlimited."""
    if not isinstance(value, dict):
        raise invalid_field("rlimits", "field 'rlimits' must be an object like {\"nofile\": 4096}, got %s"
                            % _json_type(value))
    limits = {}
    for name, limit in value.items():
        if name not in RLIMIT_NAMES:
            raise invalid_field("rlimits", "unknown rlimit %r (one of %s)" % (name[:40], ", ".join(RLIMIT_NAMES)))
        pair = limit if isinstance(limit, list) else [limit, limit]
        if len(pair) != 2 or not all(_is_int(item) and -1 <= item <= 2 ** 62 for item in pair) \
                or (-1 not in pair and pair[0] > pair[1]) or (pair[1] != -1 and pair[0] == -1):
            raise invalid_field("rlimits", "rlimit %r must be a number or [soft, hard] (-1 = unlimited, "
                                "soft <= hard), got %s" % (name, _json_type(limit)))
        limits[name] = pair
    return limits


def parse_namespace(value: Any) -> str:
    text = _check_str("namespace", value)
    if not NAMESPACE_RE.match(text):
        raise invalid_field("namespace", "field 'namespace' must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}, got %r"
                            % text[:80])
    return text


def parse_env_file(text: str) -> Dict[str, str]:
    """KEY=VALUE lines of a .env file: blank lines and # comments skipped, `export ` allowed,
    a value in matching single or double quotes taken as it is inside them."""
    env = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, equals, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not equals or not ENV_NAME_RE.match(key):
            raise ValueError("line %d is not KEY=VALUE" % number)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value.replace("\x00", "")
    return env


CRON_FIELDS = (("minute", 0, 59, ()), ("hour", 0, 23, ()), ("day of month", 1, 31, ()),
               ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")),
               ("day of week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")))
CRON_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)     # the most days each month has


class CronSchedule(NamedTuple):
    """A parsed five-field cron expression: the allowed values of each field."""
    minutes: frozenset
    hours: frozenset
    days: frozenset
    months: frozenset
    weekdays: frozenset          # 0 = Sunday (7 is folded into 0)
    any_day: bool                # day of month was "*"
    any_weekday: bool            # day of week was "*"

    def matches_day(self, day: datetime.date) -> bool:
        """Cron's rule: when both day fields are restricted, either may match."""
        in_month = day.day in self.days
        in_week = (day.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return in_month and in_week
        return in_month or in_week

    def next_after(self, moment: datetime.datetime) -> datetime.datetime:
        """The first minute strictly after `moment` that the schedule names (naive local time)."""
        start = moment.replace(second=0, microsecond=0) + datetime.timedelta(minutes=1)
        day = start.date()
        for _ in range(366 * 9):                 # "0 0 29 2 *" may wait 8 years (2096 -> 2104)
            if day.month in self.months and self.matches_day(day):
                first = (start.hour, start.minute) if day == start.date() else (0, 0)
                for hour in sorted(self.hours):
                    for minute in sorted(self.minutes):
                        if (hour, minute) >= first:
                            return datetime.datetime.combine(day, datetime.time(hour, minute))
            day += datetime.timedelta(days=1)
        raise ValueError("the schedule names no time in the next nine years")


def parse_cron(text: str) -> CronSchedule:
    """Five fields (minute hour day-of-month month day-of-week) with *, ranges a-b, steps /n,
    lists a,b and names (jan-dec, sun-sat); raises ValueError naming what is wrong."""
    fields = text.split()
    if len(fields) != 5:
        raise ValueError("a cron expression has 5 fields (minute hour day month weekday), got %d" % len(fields))
    sets = [_cron_field(field, *spec) for field, spec in zip(fields, CRON_FIELDS)]
    weekdays = frozenset(day % 7 for day in sets[4])
    # Only with day of week "*" must the day of month exist (with both restricted, either
    # matches: cron's OR rule); 29 February counts, it comes in leap years.
    if fields[4] == "*" and not any(day <= CRON_MONTH_DAYS[month - 1] for month in sets[3] for day in sets[2]):
        raise ValueError("day of month %r never comes in month %r" % (fields[2], fields[3]))
    return CronSchedule(sets[0], sets[1], sets[2], sets[3], weekdays, fields[2] == "*", fields[4] == "*")


def _cron_field(field: str, what: str, low: int, high: int, names: Tuple[str, ...]) -> frozenset:
    values = set()
    for part in field.lower().split(","):
        body, _, step_text = part.partition("/")
        step = int(step_text) if step_text.isdigit() and int(step_text) > 0 else None
        if step_text and step is None:
            raise ValueError("bad step %r in the %s field" % (step_text, what))
        if body == "*":
            first, last = low, high
        else:
            start_text, dash, end_text = body.partition("-")
            first = _cron_value(start_text, what, low, high, names)
            last = _cron_value(end_text, what, low, high, names) if dash else (high if step else first)
            if last < first:
                raise ValueError("range %r runs backwards in the %s field" % (body, what))
        values.update(range(first, last + 1, step or 1))
    return frozenset(values)


def _cron_value(text: str, what: str, low: int, high: int, names: Tuple[str, ...]) -> int:
    if text in names:
        return names.index(text) + (1 if what == "month" else 0)
    if not is_ascii_digits(text) or not low <= int(text) <= high:
        raise ValueError("%r is not a %s (%d-%d%s)" % (text, what, low, high, ", or a name" if names else ""))
    return int(text)


def parse_watch(value: Any) -> List[str]:
    """watch: true (the cwd), false, or paths relative to the cwd."""
    if value is True:
        return ["."]
    if value is False:
        return []
    return [_check_str("watch", item) for item in parse_names_list("watch", value)]


def parse_names_list(field: str, value: Any) -> List[str]:
    if not isinstance(value, list) or len(value) > MAX_LIST_ITEMS or not all(isinstance(item, str) for item in value):
        raise invalid_field(field, "field %r must be true, false or an array of paths, got %s" % (field, _json_type(value)))
    return value


def parse_log_path(field: str, value: Any) -> Optional[str]:
    """out_file/error_file: an absolute path (where it may be is checked against the others)."""
    if value is None:
        return None
    path = _check_str(field, value)
    if not os.path.isabs(path) or os.path.normpath(path) != path or path.endswith("/"):
        raise invalid_field(field, "field %r must be an absolute, normalised file path, got %r" % (field, path[:200]))
    return path


def _check_choice(field: str, value: Any, choices: Tuple[str, ...]) -> str:
    if value not in choices:
        raise invalid_field(field, "field %r must be one of %s, got %s" % (field, ", ".join(choices), _json_type(value)))
    return value


def parse_cron_field(value: Any) -> Optional[str]:
    if value is None:
        return None
    text = _check_str("cron_restart", value)
    try:
        parse_cron(text)
    except ValueError as exc:
        raise invalid_field("cron_restart", "field 'cron_restart': %s" % exc) from None
    return " ".join(text.split())


def parse_origin(value: Any) -> str:
    """What created a process ("file:/abs/path" for apply), so that --prune removes only its own."""
    text = _check_str("origin", value)
    if len(text) > MAX_ORIGIN:
        raise invalid_field("origin", "field 'origin' must be at most %d characters, got %d" % (MAX_ORIGIN, len(text)))
    return text


# -- process settings: one table says each field's type, default, parser and schema --------------
#    ProcessConfig is made from CONFIG_FIELDS (its attributes, order and defaults), from_dict
#    parses with it, and the OpenAPI schema (section 9) is built from it: a new setting is one
#    row here (plus its test and README row). JSON null means "the default" for every field
#    but the required ones, so no field needs its own null rule.

class Required:
    """The default of a field the user must give."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = Required()


class ConfigField(NamedTuple):
    """One process setting, in one row."""
    name: str
    type: Any                       # of the attribute, for readers
    default: Any                    # REQUIRED, or what an absent or null field gets (lists and dicts copied)
    parse: Callable[[Any], Any]     # a JSON value (never null) -> the kept value; ValidationError names the field
    schema: dict                    # JSON Schema of a non-null value; section 9 adds null for optional fields

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def text_field(name: str, default: Any = None) -> ConfigField:
    return ConfigField(name, str if default is REQUIRED else Optional[str], default,
                       lambda value: _check_str(name, value), {"type": "string", "minLength": 1})


def flag_field(name: str, default: bool) -> ConfigField:
    return ConfigField(name, bool, default, lambda value: _check_bool(name, value), {"type": "boolean"})


def count_field(name: str, default: Optional[int], low: int, high: int, **doc: str) -> ConfigField:
    return ConfigField(name, int if default is not None else Optional[int], default,
                       lambda value: _check_int(name, value, low, high),
                       dict({"type": "integer", "minimum": low, "maximum": high}, **doc))


def duration_field(name: str, default: int, high: int = MAX_DURATION_MS) -> ConfigField:
    return ConfigField(name, int, default, lambda value: parse_duration(name, value, high),
                       {"type": ["integer", "string"], "minimum": 0, "maximum": high,
                        "description": "milliseconds, or \"500ms\", \"5s\", \"2m\""})


def size_field(name: str, default: Optional[int]) -> ConfigField:
    return ConfigField(name, int if default is not None else Optional[int], default,
                       lambda value: parse_size(name, value),
                       {"type": ["integer", "string"], "minimum": 1, "maximum": MAX_SIZE,
                        "description": "bytes, or \"512K\", \"150M\", \"1.5G\""})


def log_path_field(name: str) -> ConfigField:
    return ConfigField(name, Optional[str], None, lambda value: parse_log_path(name, value),
                       {"type": "string", "pattern": "^/"})


def identity_field(name: str, description: str) -> ConfigField:
    """user/group: a name, or a number kept as its text."""
    def parse(value: Any) -> str:
        return _check_str(name, value if isinstance(value, str) else str(_check_int(name, value, 0, MAX_ID)))
    return ConfigField(name, Optional[str], None, parse,
                       {"type": ["string", "integer"], "minimum": 0, "maximum": MAX_ID, "description": description})


def anchored(regex) -> str:
    """A \\Z-ended regex as a JSON Schema pattern (which matches anywhere unless anchored)."""
    return "^" + regex.pattern.rstrip("\\Z") + "$"


CONFIG_FIELDS: Dict[str, ConfigField] = {field.name: field for field in (
    ConfigField("name", str, REQUIRED, parse_name, {"type": "string", "pattern": anchored(NAME_RE)}),
    text_field("script", REQUIRED),
    ConfigField("args", List[str], [], parse_args,
                {"type": "array", "items": {"type": "string"}, "maxItems": MAX_ARGS}),
    text_field("cwd"),
    ConfigField("env", Dict[str, str], {}, parse_env,
                {"type": "object", "additionalProperties": {"type": "string"}, "maxProperties": MAX_ENV_VARS}),
    ConfigField("port", Optional[str], None, lambda value: parse_port_value("port", value),
                {"type": ["integer", "string"], "minimum": 1, "maximum": 65535,
                 "pattern": "^(auto|auto:[0-9]{1,5}-[0-9]{1,5}|[0-9]{1,5}(-[0-9]{1,5})?)$",
                 "description": "3000, \"3000-3003\", \"auto\" or \"auto:3000-3100\""}),
    count_field("instances", 1, 1, MAX_INSTANCES),
    flag_field("shell", False),
    flag_field("autorestart", True),
    count_field("max_restarts", DEFAULT_MAX_RESTARTS, 0, 1_000_000),
    duration_field("min_uptime", DEFAULT_MIN_UPTIME_MS),
    duration_field("restart_delay", DEFAULT_RESTART_DELAY_MS),
    duration_field("exp_backoff_restart_delay", 0, BACKOFF_MAX_MS),
    ConfigField("stop_exit_codes", List[int], [], parse_exit_codes,
                {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255},
                 "maxItems": MAX_LIST_ITEMS}),
    ConfigField("kill_signal", str, "SIGTERM", parse_signal_name, {"type": "string", "enum": list(KILL_SIGNALS)}),
    duration_field("kill_timeout", DEFAULT_KILL_TIMEOUT_MS, 3_600_000),
    size_field("max_memory_restart", None),
    size_field("log_max_size", DEFAULT_LOG_MAX_SIZE),
    count_field("log_max_files", DEFAULT_LOG_MAX_FILES, 1, 100),
    ConfigField("health_check", Optional[dict], None, parse_health_check, {"type": "object"}),
    flag_field("restart_on_unhealthy", True),
    flag_field("wait_ready", False),
    duration_field("listen_timeout", DEFAULT_LISTEN_TIMEOUT_MS),
    ConfigField("depends_on", List[str], [], lambda value: parse_names("depends_on", value),
                {"type": "array", "items": {"type": "string", "pattern": anchored(NAME_RE)},
                 "maxItems": MAX_PROCESSES}),
    flag_field("autostart", True),
    ConfigField("namespace", str, "default", parse_namespace, {"type": "string", "pattern": anchored(NAMESPACE_RE)}),
    flag_field("stdin", False),
    text_field("env_file"),
    text_field("interpreter"),
    ConfigField("interpreter_args", List[str], [],
                lambda value: [_check_str("interpreter_args", item, allow_empty=True) for item in parse_args(value)],
                {"type": "array", "items": {"type": "string"}, "maxItems": MAX_ARGS}),
    ConfigField("umask", Optional[int], None, parse_umask,
                {"type": ["string", "integer"], "minimum": 0, "maximum": 511, "pattern": "^0?[0-7]{1,3}$"}),
    ConfigField("rlimits", Dict[str, List[int]], {}, parse_rlimits,
                {"type": "object", "propertyNames": {"enum": list(RLIMIT_NAMES)}}),
    ConfigField("cron_restart", Optional[str], None, parse_cron_field,
                {"type": "string", "description": "five cron fields, e.g. \"0 3 * * *\""}),
    ConfigField("watch", List[str], [], parse_watch,
                {"type": ["boolean", "array"], "items": {"type": "string"}, "maxItems": MAX_LIST_ITEMS}),
    ConfigField("watch_ignore", List[str], list(WATCH_IGNORE_DEFAULT),
                lambda value: [_check_str("watch_ignore", item) for item in parse_names_list("watch_ignore", value)],
                {"type": "array", "items": {"type": "string"}, "maxItems": MAX_LIST_ITEMS}),
    duration_field("watch_delay", WATCH_DELAY_MS, 600_000),
    identity_field("user", "run as this user (the daemon must be root)"),
    identity_field("group", "and this group (default: the user's)"),
    log_path_field("out_file"),
    log_path_field("error_file"),
    flag_field("merge_logs", False),
    ConfigField("log_date_format", str, "iso", lambda value: _check_choice("log_date_format", value, ("iso", "none")),
                {"type": "string", "enum": ["iso", "none"]}),
    size_field("memory_limit", None),
    count_field("cpu_limit", None, 1, 100 * 1024, description="% of one core"),
    ConfigField("origin", Optional[str], None, parse_origin, {"type": "string", "maxLength": MAX_ORIGIN}),
)}


def record_of(fields: Dict[str, ConfigField]):
    """Make a class a record whose fields are these, in order, with their defaults (a list or
    dict default is copied for each record); cls.required_fields names those without one."""
    def make(cls):
        cls.__annotations__ = {name: field.type for name, field in fields.items()}
        for name, field in fields.items():
            if isinstance(field.default, (list, dict)):       # flat: a shallow copy is a new one
                setattr(cls, name, record_field(functools.partial(type(field.default), field.default)))
            elif not field.required:
                setattr(cls, name, field.default)
        cls.required_fields = tuple(name for name, field in fields.items() if field.required)
        return record(cls)
    return make


@record_of(CONFIG_FIELDS)
class ProcessConfig:
    """Everything a user can set for a managed process (the POST /api/processes body): the
    fields of CONFIG_FIELDS."""

    @classmethod
    def from_dict(cls, data: Any, base_dir: Optional[str] = None, check_cwd: bool = True) -> "ProcessConfig":
        """Validate a user's JSON object; raise HttpError(400) naming the first bad field.
        check_cwd=False for saved state: a vanished cwd is reported when the start fails."""
        if not isinstance(data, dict):
            raise BadRequest("request body must be a JSON object, got %s" % _json_type(data))
        for key in data:
            if key not in CONFIG_FIELDS:
                raise invalid_field(key, "unknown field %r" % key[:80])
        for required in cls.required_fields:
            if data.get(required) is None:
                raise invalid_field(required, "field %r is required" % required)
        config = cls(**{key: CONFIG_FIELDS[key].parse(value) for key, value in data.items() if value is not None})
        if check_cwd:
            config.cwd = _resolve_cwd(config.cwd, base_dir)
        config.check_consistency()
        return config

    def check_consistency(self) -> None:
        """Rules that involve more than one field."""
        if self.wait_ready and not (self.health_check and self.health_check["enabled"]):
            raise invalid_field("wait_ready", "wait_ready needs an enabled health_check to know "
                                "when the process is ready")
        check = self.health_check
        if check and check["type"] == "tcp" and check["port"] is None and self.port is None:
            raise invalid_field("health_check", "a tcp health_check needs a 'port' (or the process's port)")
        if self.name in self.depends_on:
            raise invalid_field("depends_on", "depends_on forms a cycle: %s -> %s" % (self.name, self.name))

    def to_dict(self) -> dict:
        return record_asdict(self)


def _resolve_cwd(cwd: Optional[str], base_dir: Optional[str]) -> str:
    base = base_dir or os.getcwd()
    path = os.path.normpath(os.path.join(base, os.path.expanduser(cwd))) if cwd else base
    if not os.path.isdir(path):
        raise invalid_field("cwd", "field 'cwd' is not an existing directory: %r" % path)
    return path


@record
class DaemonConfig:
    """Options of `pmdaemon.py web`."""
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: Optional[str] = None
    read_keys: Tuple[str, ...] = ()
    home: str = os.path.expanduser(DEFAULT_HOME)
    allow_hosts: Tuple[str, ...] = ()
    cors_origins: Tuple[str, ...] = ()
    sample_interval: float = SAMPLE_INTERVAL
    max_connections: int = MAX_CONNECTIONS
    max_ws_clients: int = MAX_WS_CLIENTS
    ws_ping_interval: float = WS_PING_INTERVAL
    ws_pong_timeout: float = WS_PONG_TIMEOUT
    ws_slow_grace: float = WS_SLOW_GRACE
    header_timeout: float = HEADER_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    tls: Any = None                         # TlsFiles when serving HTTPS
    max_body_bytes: int = MAX_BODY_BYTES
    max_body_memory: int = MAX_BODY_MEMORY
    keepalive_timeout: float = KEEPALIVE_TIMEOUT
    write_timeout: float = WRITE_TIMEOUT


# ==============================================================================================
# 4. Metrics
#    Pure parsers of /proc text, and a Sampler that reads /proc (root injectable for tests) and
#    keeps the previous sample so CPU % covers the last interval. Knows nothing of processes
#    being managed: it measures pids it is given.
# ==============================================================================================

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class PidStat(NamedTuple):
    """The fields of /proc/PID/stat that supervision needs."""
    pid: int
    state: str
    ppid: int
    pgid: int
    sid: int
    cpu_ticks: int      # utime + stime
    start_ticks: int    # start time since boot, in clock ticks: (pid, start_ticks) names a process
    rss_bytes: int


def parse_pid_stat(text: str) -> PidStat:
    """Parse /proc/PID/stat; the command name may hold spaces and parentheses."""
    open_paren, close_paren = text.index("("), text.rindex(")")
    fields = text[close_paren + 2:].split()
    # fields[0] is field 3 of proc(5): state, ppid, pgrp, session, ... utime(14), stime(15)
    return PidStat(pid=int(text[:open_paren]), state=fields[0], ppid=int(fields[1]),
                   pgid=int(fields[2]), sid=int(fields[3]),
                   cpu_ticks=int(fields[11]) + int(fields[12]), start_ticks=int(fields[19]),
                   rss_bytes=int(fields[21]) * PAGE_SIZE)


def parse_cpu_times(text: str) -> Tuple[int, int]:
    """Return (busy, total) jiffies from the aggregate "cpu" line of /proc/stat."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + (values[4] if len(values) > 4 else 0)   # idle + iowait
            total = sum(values[:8])                                    # guest is inside user
            return total - idle, total
    raise ValueError("no cpu line in /proc/stat")


def parse_meminfo(text: str) -> Tuple[int, int]:
    """Return (total, available) bytes from /proc/meminfo."""
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            values[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    total = values["MemTotal"]
    available = values.get("MemAvailable", values.get("MemFree", 0) + values.get("Cached", 0))
    return total, available


def percent(part: float, whole: float) -> float:
    return round(100.0 * part / whole, 1) if whole > 0 else 0.0


@record
class SystemMetrics:
    cpu_usage: float = 0.0
    cores: int = 1
    memory_total: int = 0
    memory_available: int = 0
    load: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    uptime: int = 0
    wall_time: float = 0.0

    @property
    def memory_used(self) -> int:
        return self.memory_total - self.memory_available

    def to_api(self) -> dict:
        """The GET /api/system body."""
        return {
            "cpu": {"usage": self.cpu_usage, "cores": self.cores},
            "memory": {"total": self.memory_total, "used": self.memory_used,
                       "available": self.memory_available,
                       "usage_percent": percent(self.memory_used, self.memory_total)},
            "load": {"one": self.load[0], "five": self.load[1], "fifteen": self.load[2]},
            "uptime": self.uptime,
            "timestamp": iso_time(self.wall_time),
        }

    def to_update(self) -> dict:
        """The data of a WebSocket system_update message."""
        return {"cpu": self.cpu_usage,
                "memory": {"usage_percent": percent(self.memory_used, self.memory_total),
                           "used": self.memory_used},
                "load": {"one": self.load[0], "five": self.load[1], "fifteen": self.load[2]},
                "timestamp": iso_time(self.wall_time)}


def iso_time(wall_time: float, milliseconds: bool = False) -> str:
    """ISO 8601 UTC with a Z, as the spec shows ("2024-01-15T14:30:25Z")."""
    seconds = math.floor(wall_time)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if milliseconds:
        return text + ".%03dZ" % min(999, int((wall_time - seconds) * 1000))
    return text + "Z"


class Sampler:
    """Reads system and per-process-tree usage from /proc; CPU % is over the previous call."""

    def __init__(self, proc_root: str = "/proc", clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.proc_root = proc_root
        self.clock = clock
        self.wall = wall
        self._previous_cpu: Optional[Tuple[int, int]] = None
        self._previous_ticks: Dict[Any, Tuple[float, int]] = {}
        self.unreadable: set = set()        # what could not be read last time (reported once)
        self.cores = os.cpu_count() or 1
        self._known: Dict[int, Tuple[int, PidStat]] = {}    # pid -> (its /proc inode, what was read)
        self._scans = 0
        self._last_table: Optional[Dict[int, PidStat]] = None
        self._last_scan_at = 0.0
        self._held: Dict[int, int] = {}     # pid -> open /proc/PID/stat of a process re-read every tick

    def _read(self, *parts: str) -> str:
        return self._read_bytes(*parts).decode("ascii", "replace")

    def system(self) -> SystemMetrics:
        """System metrics; a /proc file that is missing, masked or odd degrades its own values
        (to zero) and is reported once, never an exception: the daemon must outlive /proc."""
        metrics = SystemMetrics(cores=self.cores, wall_time=self.wall())
        cpu = self._guarded("stat", lambda: parse_cpu_times(self._read("stat")))
        if cpu is not None:
            if self._previous_cpu is not None:
                metrics.cpu_usage = percent(cpu[0] - self._previous_cpu[0], cpu[1] - self._previous_cpu[1])
            self._previous_cpu = cpu
        memory = self._guarded("meminfo", lambda: parse_meminfo(self._read("meminfo")))
        if memory is not None:
            metrics.memory_total, metrics.memory_available = memory
        load = self._guarded("loadavg", os.getloadavg)
        if load is not None:
            metrics.load = tuple(round(value, 2) for value in load)
        uptime = self._guarded("uptime", lambda: int(float(self._read("uptime").split()[0])))
        if uptime is not None:
            metrics.uptime = uptime
        return metrics

    def _guarded(self, what: str, read: Callable[[], Any]) -> Any:
        try:
            value = read()
        except (OSError, ValueError, IndexError, KeyError, OverflowError) as exc:
            self.note_unreadable(what, exc)
            return None
        self.unreadable.discard(what)
        return value

    def note_unreadable(self, what: str, exc: Exception) -> None:
        """Said once until it can be read again."""
        if what not in self.unreadable:
            self.unreadable.add(what)
            log.warning("cannot read %s from %s (%s); its metrics show 0", what, self.proc_root, exc)

    def stat(self, pid: int) -> Optional[PidStat]:
        try:
            return parse_pid_stat(self._read(str(pid), "stat"))
        except (OSError, ValueError, IndexError):
            return None

    def scan(self, reuse_within: float = 0.0) -> Dict[int, PidStat]:
        """Every process visible in /proc, by pid, reading only those not seen before.

        A process listed under the same pid and the same /proc inode as at the last scan is
        the same process (a reused pid gets a new inode), so what was read of it stands: its
        start time and group never change, and its parent can only change to a reaper, which
        keeps it in the tree it was in. What must be current (usage, state, a group that may
        have been left) callers re-read with fresh(). Every SCAN_FULL_EVERY-th scan reads all.
        A listing taken less than `reuse_within` seconds ago is returned again: the steps of
        one stop look at /proc twice in a row, and the listing is what grows with the box."""
        if reuse_within and self._last_table is not None and time.monotonic() - self._last_scan_at < reuse_within:
            return self._last_table
        self._scans += 1
        full = self._scans % SCAN_FULL_EVERY == 0
        known, table, now_known = self._known, {}, {}
        with os.scandir(self.proc_root) as entries:
            for entry in entries:
                name = entry.name
                if not name.isdigit():
                    continue
                pid, inode = int(name), entry.inode()
                seen = known.get(pid)
                if seen is not None and seen[0] == inode and not full:
                    found = seen[1]
                else:
                    found = self.stat(pid)
                    if found is None:
                        continue
                table[pid] = found
                now_known[pid] = (inode, found)
        self._known = now_known
        for pid in [pid for pid in self._held if pid not in now_known]:
            self._let_go(pid)
        self._last_table, self._last_scan_at = table, time.monotonic()   # real time: /proc is real
        return table

    def fresh(self, table: Dict[int, PidStat], pids: List[int]) -> bool:
        """Re-read `pids` into `table` (and the scan's memory); those gone are removed. True
        when a parent link changed or a process went (trees must be walked again)."""
        changed = False
        for pid in pids:
            found = self._read_held(pid)
            seen = self._known.get(pid)
            old = table.pop(pid, None)
            if found is None or (seen is not None and seen[1].start_ticks != found.start_ticks):
                self._known.pop(pid, None)  # gone, or the pid now names another process
                changed = True
                continue
            table[pid] = found
            changed = changed or old is None or old.ppid != found.ppid
            if seen is not None:
                self._known[pid] = (seen[0], found)
        return changed

    def _read_held(self, pid: int) -> Optional[PidStat]:
        """/proc/PID/stat of a process read every tick, through a descriptor kept open: one
        pread instead of open, read, close (the descriptor names that very process: once it
        is gone, reads fail rather than show another process that got its pid)."""
        descriptor = self._held.get(pid)
        try:
            if descriptor is None:
                if len(self._held) >= MAX_HELD_STAT_FILES:
                    return self.stat(pid)
                descriptor = self._held[pid] = os.open("%s/%d/stat" % (self.proc_root, pid),
                                                       os.O_RDONLY | os.O_CLOEXEC)
            return parse_pid_stat(os.pread(descriptor, 4096, 0).decode("ascii", "replace"))
        except (OSError, ValueError, IndexError):
            self._let_go(pid)
            return None

    def _let_go(self, pid: int) -> None:
        if pid in self._held:
            os.close(self._held.pop(pid))

    def close(self) -> None:
        for pid in list(self._held):
            self._let_go(pid)

    def tree_cpu(self, key: Any, ticks: int) -> float:
        """CPU % of one core used by `key` since its previous sample, from cumulative ticks."""
        now = self.clock()
        previous = self._previous_ticks.get(key)
        self._previous_ticks[key] = (now, ticks)
        if previous is None or now <= previous[0]:
            return 0.0
        used = max(0, ticks - previous[1]) / CLOCK_TICKS
        return round(100.0 * used / (now - previous[0]), 1)

    def add_to_baseline(self, key: Any, ticks: int) -> None:
        """Ticks that `key` had before they were counted in it (a process that joined its tree)."""
        previous = self._previous_ticks.get(key)
        if previous is not None:
            self._previous_ticks[key] = (previous[0], previous[1] + ticks)

    def forget(self, key: Any) -> None:
        self._previous_ticks.pop(key, None)

    def environ_has(self, pid: int, entry: bytes) -> bool:
        """True if the process was started with `entry` (b"NAME=value") in its environment."""
        try:
            return entry in self._read_bytes(str(pid), "environ").split(b"\0")
        except OSError:
            return False

    def _read_bytes(self, *parts: str) -> bytes:
        """The whole file, with the fewest calls (no file object: this runs for every pid)."""
        descriptor = os.open(self.proc_root + "/" + "/".join(parts), os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(descriptor, 65536)
            if len(data) < 4096:
                return data                 # /proc answers a small file in one read
            chunks = [data]
            while data:
                data = os.read(descriptor, 65536)
                chunks.append(data)
            return b"".join(chunks)
        finally:
            os.close(descriptor)


def children_index(table: Dict[int, PidStat]) -> Dict[int, List[int]]:
    """Parent pid -> child pids, built once per scan and shared by every tree walk."""
    children: Dict[int, List[int]] = {}
    for stat in table.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    return children


def descendants(table: Dict[int, PidStat], root: int,
                children: Optional[Dict[int, List[int]]] = None) -> List[int]:
    """Pids of root and everything below it by parent links (root first); linear time."""
    if children is None:
        children = children_index(table)
    found, seen, stack = [], set(), [root]
    while stack:
        pid = stack.pop()
        if pid in table and pid not in seen:
            seen.add(pid)
            found.append(pid)
            stack.extend(children.get(pid, ()))
    return found


# ==============================================================================================
# 5. Logs
#    Each process has two files (stdout, stderr) under $PMDAEMON_HOME/logs, one line per output
#    line, prefixed by an ISO time with milliseconds. Files rotate by size; tail_lines reads
#    backwards so GET /api/logs never reads a whole file. Every line also goes to the LogHub,
#    the one subscription mechanism for HTTP followers and WebSocket clients. A write error
#    drops the line from the file and is reported; the child's pipe is always drained.
# ==============================================================================================

LOG_TYPES = ("stdout", "stderr")


class LogEntry(NamedTuple):
    timestamp: Optional[str]            # None for a log written without timestamps
    type: str
    message: str

    def to_api(self) -> dict:
        return {"timestamp": self.timestamp, "type": self.type, "message": self.message}


def tail_lines(path: str, count: int, max_bytes: int = MAX_LOG_READ_BYTES,
               block_size: int = TAIL_BLOCK) -> List[bytes]:
    """The last `count` lines of a file, oldest first, reading backwards block by block: the
    cost follows the lines returned, never the file's size (and stops at max_bytes read)."""
    if count <= 0 or max_bytes <= 0:
        return []
    try:
        descriptor = open_private(path, os.O_RDONLY)
    except FileNotFoundError:
        return []
    return tail_descriptor(descriptor, count, max_bytes, block_size)


def tail_descriptor(descriptor: int, count: int, max_bytes: int = MAX_LOG_READ_BYTES,
                    block_size: int = TAIL_BLOCK) -> List[bytes]:
    """tail_lines on an open descriptor, which it closes."""
    handle = open(descriptor, "rb")
    blocks: List[bytes] = []
    newlines = 0
    with handle:
        position = end = handle.seek(0, os.SEEK_END)
        while position > 0 and newlines <= count and end - position < max_bytes:
            step = min(block_size, position, max_bytes - (end - position))
            position -= step
            handle.seek(position)
            block = handle.read(step)
            newlines += block.count(b"\n")        # each block is counted once: linear
            blocks.append(block)
    lines = b"".join(reversed(blocks)).split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if position > 0:        # the first piece may be the tail of a line we did not read whole
        lines = lines[1:]
    return lines[-count:]


def open_private(path: str, flags: int = os.O_WRONLY | os.O_APPEND | os.O_CREAT) -> int:
    """A descriptor for a file of ours: created 0600, never through a symbolic link (ELOOP),
    never waiting (a FIFO planted in its place fails with ENXIO or is refused by its type)."""
    return os.open(path, flags | O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)


# -- paths that someone else may influence ------------------------------------------------------
# out_file, error_file and env_file name places in directories that an app's own user (or
# another) may control: links, FIFOs, directories swapped between two looks. Such a path is
# walked from "/" one directory at a time, never following a link, each directory owned by
# root or a trusted user; then the directory is used only through its descriptor.

O_PATH = getattr(os, "O_PATH", 0)


def open_directory_no_links(path: str, owners: frozenset) -> int:
    """A descriptor of the absolute directory `path`, reached without following a link; every
    directory on the way belongs to root or one of `owners`. OSError says which part is wrong."""
    if not os.path.isabs(path):
        raise OSError(errno.EINVAL, "%s is not an absolute path" % path)
    descriptor = os.open("/", O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    walked = ""
    try:
        for part in [part for part in path.split("/") if part not in ("", ".")]:
            walked += "/" + part
            if part == "..":
                raise OSError(errno.EPERM, "%s: '..' is not followed" % walked)
            try:
                inner = os.open(part, O_PATH | os.O_DIRECTORY | O_NOFOLLOW | os.O_CLOEXEC, dir_fd=descriptor)
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise OSError(exc.errno, "%s is a link or not a directory (links are not followed here)"
                                  % walked) from None
                raise OSError(exc.errno, "%s: %s" % (walked, exc.strerror)) from None
            os.close(descriptor)
            descriptor = inner
            owner = os.fstat(descriptor).st_uid
            if owner != 0 and owner not in owners:
                raise OSError(errno.EPERM, "%s belongs to another user (uid %d)" % (walked, owner))
        return descriptor
    except BaseException:
        os.close(descriptor)
        raise


def open_plain_file(directory: int, name: str, flags: int, owners: Optional[frozenset] = None,
                    mode: int = 0o600) -> Tuple[int, bool]:
    """(descriptor, created) of the file `name` in a held directory: never a link (O_NOFOLLOW),
    never waiting (O_NONBLOCK: a FIFO fails or is refused), a regular file with one link (a
    hard link could be someone else's file), owned by one of `owners` when given. With
    O_CREAT, created says whether this open made the file."""
    flags |= O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    created = False
    if flags & os.O_CREAT:
        try:
            descriptor, created = os.open(name, flags | os.O_EXCL, mode, dir_fd=directory), True
        except FileExistsError:
            descriptor = os.open(name, flags & ~os.O_CREAT, dir_fd=directory)
    else:
        descriptor = os.open(name, flags, dir_fd=directory)
    info = os.fstat(descriptor)
    problem = ("not a regular file" if not stat_module.S_ISREG(info.st_mode) else
               "a file with other hard links" if info.st_nlink != 1 else
               "owned by another user (uid %d)" % info.st_uid if owners is not None and info.st_uid not in owners
               else None)
    if problem:
        os.close(descriptor)
        raise OSError(errno.EPERM, "%s is %s" % (name, problem))
    return descriptor, created


class LogFile:
    """One append-only, size-rotated log file: path, path.1, ... path.(max_files - 1).

    A file of the home is used by its path (the home is ours and checked). A placed file
    (out_file/error_file, `placed`) lives where someone else may act: its directory is reached
    by prepare() (off the event loop, at each start of the process) without following a link,
    then held, and every open, rename and unlink happens through that descriptor."""

    def __init__(self, path: str, max_size: int, max_files: int, owner: Optional[Tuple[int, int]] = None,
                 placed: bool = False, adopt_from: Optional[int] = None):
        self.path = path
        self.max_size = max_size
        self.max_files = max_files
        self.owner = owner                      # (uid, gid) a placed file is given when we create it
        self.placed = placed
        self.adopt_from = adopt_from            # the process's previous user: its files pass to owner
        self.directory: Optional[int] = None    # a placed file's directory, held
        self._handle = None
        self._size = 0

    @property
    def owners(self) -> frozenset:
        return frozenset({os.getuid()} | ({self.owner[0]} if self.owner else set()))

    def prepare(self) -> None:
        """(Re)reach a placed file's directory and open the file: blocking work, for a thread."""
        if not self.placed:
            return
        directory = open_directory_no_links(os.path.dirname(self.path), self.owners)
        self.release()
        self.directory = directory
        self._handle = self._open()
        self._size = self._handle.seek(0, os.SEEK_END)

    def _name(self, index: int = 0) -> str:
        name = os.path.basename(self.path) if self.placed else self.path
        return name if index == 0 else "%s.%d" % (name, index)

    def _at(self) -> Dict[str, int]:
        return {"dir_fd": self.directory} if self.placed else {}

    def _open(self):
        if not self.placed:
            descriptor = open_private(self.path)
            info = os.fstat(descriptor)
            # A file in a directory someone else can write may be a planted hard link to another
            # file (O_NOFOLLOW only stops symbolic ones): write only to a plain, singly linked file.
            if not stat_module.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_uid != os.getuid():
                os.close(descriptor)
                raise OSError(errno.EPERM, "%s is not a plain log file of ours (a link, or someone else's)" % self.path)
            return open(descriptor, "ab", buffering=0)
        if self.directory is None:
            raise OSError(errno.EBADF, "%s: the process has not been started since its log moved" % self.path)
        owners = self.owners | ({self.adopt_from} if self.adopt_from is not None else set())
        descriptor, created = open_plain_file(self.directory, self._name(), os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                                              owners, 0o640)
        # Only a file we made, or one we gave the process's previous user, changes hands: a
        # file that was there before is never given away (it might be anyone's).
        if self.owner is not None and (created or os.fstat(descriptor).st_uid == self.adopt_from):
            os.fchown(descriptor, *self.owner)
        return open(descriptor, "ab", buffering=0)

    def write(self, data: bytes) -> None:
        """Append data; on an error the file is closed so the next write starts afresh."""
        try:
            if self._handle is None:
                self._handle = self._open()
                self._size = self._handle.seek(0, os.SEEK_END)
            if self._size and self._size + len(data) > self.max_size:
                self.rotate()
                self._handle = self._open()
                self._size = 0
            self._append(data)
        except OSError:
            self.close()
            raise

    def _append(self, data: bytes) -> None:
        """Write whole lines or none: an unbuffered write may be short when the disk fills, and
        what part of `data` went in is taken back, so the next line never lands glued to half
        of this one."""
        start = self._size
        view = memoryview(data)
        try:
            while view:
                written = self._handle.write(view)
                self._size += written
                view = view[written:]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._handle.fileno(), start)
            self._size = start
            raise

    def rotate(self) -> None:
        self.close()
        at = self._at()
        if self.max_files <= 1:      # nothing to keep: start the file afresh
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._name(), **at)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._name(self.max_files - 1), **at)
        for index in range(self.max_files - 2, -1, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self._name(index), self._name(index + 1),
                           **({"src_dir_fd": self.directory, "dst_dir_fd": self.directory} if self.placed else {}))

    def files_newest_first(self) -> List[str]:
        return [self.path] + ["%s.%d" % (self.path, i) for i in range(1, self.max_files)]

    def tail(self, count: int, max_bytes: int = MAX_LOG_READ_BYTES) -> List[bytes]:
        """Last `count` lines across the rotation boundary, oldest first, reading at most
        about max_bytes in all."""
        lines: List[bytes] = []
        for index in range(self.max_files):
            budget = max_bytes - sum(len(line) + 1 for line in lines)
            if len(lines) >= count or budget <= 0 or (self.placed and self.directory is None):
                break
            try:
                descriptor = (open_plain_file(self.directory, self._name(index), os.O_RDONLY)[0] if self.placed
                              else open_private(self._name(index), os.O_RDONLY))
            except FileNotFoundError:
                break
            lines = tail_descriptor(descriptor, count - len(lines), budget) + lines
        return lines

    def move_to(self, path: str) -> None:
        """Rename the file and its rotations (a process renamed by scaling keeps its logs)."""
        self.close()
        for old, new in zip(self.files_newest_first(), LogFile(path, 0, self.max_files).files_newest_first()):
            with contextlib.suppress(FileNotFoundError):
                os.replace(old, new)
        self.path = path

    def remove(self) -> None:
        self.close()
        if self.placed and self.directory is None:      # never reached: nothing of ours to remove
            return
        for index in range(self.max_files):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._name(index), **self._at())
        self._sync_directory()

    def _sync_directory(self) -> None:
        """fsync the directory, so that what was removed stays removed after a crash."""
        with contextlib.suppress(OSError):
            descriptor = (os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.directory)
                          if self.placed else os.open(os.path.dirname(self.path) or ".", os.O_RDONLY | os.O_CLOEXEC))
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)

    def close(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.close()
            self._handle = None

    def release(self) -> None:
        """Close the file and let go of a placed file's directory."""
        self.close()
        if self.directory is not None:
            os.close(self.directory)
            self.directory = None


def split_output(pending: bytes, chunk: bytes, max_line: int = MAX_LOG_LINE) -> Tuple[List[bytes], bytes]:
    """Split child output into complete lines (long ones cut at max_line) and the remainder."""
    data = pending + chunk
    pieces = data.split(b"\n")
    rest = pieces.pop()
    lines = []
    for piece in pieces:
        lines.extend(_cut(piece, max_line))
    while len(rest) > max_line:
        lines.append(rest[:max_line])
        rest = rest[max_line:]
    return lines, rest


def _cut(line: bytes, max_line: int) -> List[bytes]:
    if line.endswith(b"\r"):
        line = line[:-1]
    if len(line) <= max_line:
        return [line]
    return [line[i:i + max_line] for i in range(0, len(line), max_line)]


def decode_output(line: bytes) -> str:
    """Child output is bytes; show it as text, never failing on binary."""
    return line.decode("utf-8", "replace").replace("\x00", "\ufffd")


class LogLine:
    """One published line; `memo` lets subscribers of one kind encode it once for all."""
    __slots__ = ("process", "entry", "memo")

    def __init__(self, process: str, entry: LogEntry):
        self.process, self.entry, self.memo = process, entry, {}


class LogHub:
    """Who listens to which process's lines: subscribers by name, or "*" for every process.

    A subscriber has on_log(LogLine) and on_log_end(name): name is the deleted process, or
    None when the daemon shuts down. publish() costs a dict lookup when nobody listens."""

    def __init__(self):
        self._by_name: Dict[str, set] = {}

    def subscribe(self, subscriber: Any, names) -> None:
        for name in names:
            self._by_name.setdefault(name, set()).add(subscriber)

    def unsubscribe(self, subscriber: Any, names) -> None:
        for name in names:
            members = self._by_name.get(name)
            if members is not None:
                members.discard(subscriber)
                if not members:
                    del self._by_name[name]

    def listening(self, name: str) -> bool:
        return name in self._by_name or "*" in self._by_name

    def publish(self, name: str, entries: List[LogEntry]) -> None:
        direct, every = self._by_name.get(name), self._by_name.get("*")
        if not direct and not every:
            return
        targets = (direct | every) if direct and every else (direct or every)
        for entry in entries:
            line = LogLine(name, entry)
            for subscriber in list(targets):
                subscriber.on_log(line)

    def end(self, name: Optional[str]) -> None:
        """A process was deleted (name) or the daemon stops (None): tell who follows it."""
        if name is None:
            subscribers = set().union(*self._by_name.values()) if self._by_name else set()
            self._by_name.clear()
        else:
            subscribers = self._by_name.pop(name, set())
        for subscriber in subscribers:
            subscriber.on_log_end(name)


class LogLayout(NamedTuple):
    """Where a process's output goes and how its lines look (out_file, error_file, merge_logs,
    log_date_format): by default two files in the home, each line stamped."""
    out_path: Optional[str] = None          # None: NAME-out.log in the logs directory
    err_path: Optional[str] = None
    merged: bool = False                    # both streams in the stdout file, each line typed
    stamped: bool = True                    # "none" date format: the message alone
    owner: Optional[Tuple[int, int]] = None  # who out_path/err_path belong to (user/group)
    adopt_from: Optional[int] = None        # the previous user, whose files pass to owner (PATCH user)


class ProcessLogs:
    """The stdout and stderr files of one process; every line is also published to the hub.
    A write that fails drops the line from the file, counts it, and calls on_error."""

    def __init__(self, directory: str, name: str, max_size: int, max_files: int, hub: LogHub,
                 on_error: Callable[[OSError], None], wall: Callable[[], float] = time.time,
                 layout: LogLayout = LogLayout()):
        self.directory = directory
        self.name = name
        self.layout = layout
        out = self._file(layout.out_path, name, "out", max_size, max_files)
        err = out if layout.merged else self._file(layout.err_path, name, "err", max_size, max_files)
        self.files = {"stdout": out, "stderr": err}
        self.hub = hub
        self.on_error = on_error
        self.wall = wall
        self.write_errors = 0
        self.dropped_lines = 0
        self.bytes_written = 0

    def _path(self, name: str, suffix: str) -> str:
        return os.path.join(self.directory, "%s-%s.log" % (name, suffix))

    def _file(self, placed_path: Optional[str], name: str, suffix: str, max_size: int, max_files: int) -> LogFile:
        if placed_path is None:
            return LogFile(self._path(name, suffix), max_size, max_files)
        return LogFile(placed_path, max_size, max_files, self.layout.owner, placed=True,
                       adopt_from=self.layout.adopt_from)

    def prepare(self) -> None:
        """Reach the placed files (out_file/error_file) anew: blocking, for a thread, at each
        start of the process. An error is reported like a failed write; the child still runs."""
        for log_file in self.unique_files():
            try:
                log_file.prepare()
            except OSError as exc:
                log_file.release()
                self.write_errors += 1
                self.on_error(exc)

    @property
    def placed(self) -> bool:
        return any(log_file.placed for log_file in self.files.values())

    def unique_files(self) -> List[LogFile]:
        return list({id(f): f for f in self.files.values()}.values())

    def write(self, log_type: str, messages: List[str]) -> None:
        timestamp = iso_time(self.wall(), milliseconds=True)
        prefix = (timestamp + " " if self.layout.stamped else "") + \
            (log_type + " " if self.layout.merged and self.layout.stamped else "")
        data = b"".join(("%s%s\n" % (prefix, m)).encode("utf-8", "replace") for m in messages)
        try:
            self.files[log_type].write(data)
            self.bytes_written += len(data)
        except OSError as exc:
            self.write_errors += 1
            self.dropped_lines += len(messages)
            self.on_error(exc)
        if self.hub.listening(self.name):
            self.hub.publish(self.name, [LogEntry(timestamp, log_type, m) for m in messages])

    def tail(self, count: int, log_type: str = "all") -> List[LogEntry]:
        if self.layout.merged:
            entries = [self._parse(line, "stdout") for line in self.files["stdout"].tail(count * 2 if log_type != "all" else count)]
            entries = [entry for entry in entries if log_type in ("all", entry.type)]
        else:
            kinds = LOG_TYPES if log_type == "all" else (log_type,)
            entries = [self._parse(line, kind) for kind in kinds for line in self.files[kind].tail(count)]
            entries.sort(key=lambda entry: entry.timestamp or "")   # stable: keeps order within a type
        return entries[-count:] if count else []

    def _parse(self, line: bytes, log_type: str) -> LogEntry:
        text = line.decode("utf-8", "replace")
        timestamp = None
        if self.layout.stamped:
            timestamp, _, text = text.partition(" ")
            if self.layout.merged:
                kind, _, rest = text.partition(" ")
                if kind in LOG_TYPES:
                    log_type, text = kind, rest
        return LogEntry(timestamp, log_type, text)

    def own_files(self) -> List[LogFile]:
        """The files in the logs directory (what a rename moves and a delete removes); files the
        operator placed with out_file/error_file are theirs and stay."""
        return [log_file for log_file in self.unique_files() if not log_file.placed]

    def rename(self, name: str) -> None:
        for log_file in self.own_files():
            suffix = "out" if log_file is self.files["stdout"] else "err"
            log_file.move_to(self._path(name, suffix))
        self.name = name

    def remove(self) -> None:
        for log_file in self.own_files():
            log_file.remove()

    def flush(self) -> None:
        """Empty the logs (pm2 flush): rotated files go, the current ones start again at 0."""
        for log_file in self.unique_files():
            log_file.remove()

    def close(self) -> None:
        for log_file in self.unique_files():
            log_file.release()


class OutputPump:
    """A child's stdout or stderr copied to its log as the data arrives, line by line, without
    a task, a stream reader or a transport of its own (at a thousand processes, that is 10 KB
    each less): read_pipe() reads the pipe in the loop and calls feed_data and feed_eof. Whole
    lines are written at once, a partial line after flush_after of silence. Until attach()
    names the log, what arrives is kept. Whatever write does, the pipe keeps being read: a
    child must never block on us. At the end, a partial line is written, or, when the pipe
    was handed over (an upgrade), kept in `carried` for the next image, which reads the rest
    of it: a log never holds a torn line. `ended` is done once all is written."""
    __slots__ = ("loop", "write", "flush_after", "pending", "early", "timer", "last_data", "ended", "eof",
                 "handed_over", "carried", "fd")

    def __init__(self, loop):
        self.loop = loop
        self.write: Optional[Callable[[List[str]], None]] = None
        self.flush_after = PARTIAL_LINE_FLUSH
        self.pending = b""
        self.early: Optional[List[bytes]] = []   # what came before attach()
        self.timer: Any = None                  # one timer while a partial line waits, moved lazily
        self.last_data = 0.0
        self.ended = loop.create_future()
        self.eof = False
        self.handed_over = False
        self.carried = b""
        self.fd: Optional[int] = None          # the pipe read by read_pipe, until its end

    def read_pipe(self, fd: int) -> None:
        """Read `fd`, the read end of the child's pipe (ours from now on), until its end."""
        os.set_blocking(fd, False)
        self.fd = fd
        self.loop.add_reader(fd, self._read_ready)

    def _read_ready(self) -> None:
        try:
            data = os.read(self.fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:                         # a pipe that failed has ended all the same
            data = b""
        if data:
            self.feed_data(data)
        else:
            self.stop_reading()
            os.close(self.fd)
            self.fd = None
            self.feed_eof()

    def stop_reading(self) -> None:
        """Read no more (an upgrade: the pipe, still open, goes to the next image)."""
        if self.fd is not None:
            self.loop.remove_reader(self.fd)

    def attach(self, write: Callable[[List[str]], None], flush_after: float = PARTIAL_LINE_FLUSH) -> None:
        self.write, self.flush_after = write, flush_after
        early, self.early = self.early or [], None
        for chunk in early:
            self._take(chunk)
        if self.eof:
            self._finish()

    def feed_data(self, data: bytes) -> None:
        if self.early is not None:
            self.early.append(data)
        elif not self.eof:
            self._take(data)

    def feed_eof(self) -> None:
        if self.eof:
            return
        self.eof = True
        if self.early is None:
            self._finish()
        elif self.handed_over:                  # never attached: all of it goes to the next image
            self.carried, self.early = b"".join(self.early), []
            self.ended.set_result(None)

    def at_eof(self) -> bool:
        return self.eof

    def _take(self, chunk: bytes) -> None:
        lines, self.pending = split_output(self.pending, chunk)
        if lines:
            _write_safely(self.write, lines)
        if self.pending:
            self.last_data = self.loop.time()
            if self.timer is None:              # (not a new timer per chunk: it checks when due)
                self.timer = self.loop.call_later(self.flush_after, self._flush_partial)

    def _flush_partial(self, checked: bool = False) -> None:
        self.timer = None
        if not self.pending:
            return
        quiet_for = self.loop.time() - self.last_data
        if quiet_for < self.flush_after:        # more came since: wait for the silence
            self.timer = self.loop.call_later(self.flush_after - quiet_for, self._flush_partial)
        elif not checked:
            # Once more after what the loop already has: after a stalled loop, the rest of the
            # line may be waiting in the same turn of the loop as this timer.
            self.timer = self.loop.call_soon(self._flush_partial, True)
        else:
            _write_safely(self.write, [self.pending])
            self.pending = b""

    def _finish(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.handed_over:
            self.carried = self.pending
        elif self.pending:
            _write_safely(self.write, [self.pending])
        self.pending = b""
        if not self.ended.done():
            self.ended.set_result(None)


def _write_safely(write: Callable[[List[str]], None], lines: List[bytes]) -> None:
    try:
        write([decode_output(line) for line in lines])
    except Exception:
        log.exception("writing output failed; the lines were dropped")


# ==============================================================================================
# 6. Supervisor
#    In order: restart policy (pure), names and ports, a child's environment and argv, health
#    checks, stopping, watch, cgroups; then the pieces, each with one job: ProcessRunner owns
#    one process's child, tasks and timers and is the only code that changes its state
#    (change_state, checked against TRANSITIONS); it reaches the rest only through its
#    RunnerContext (clock, timers, spawner, announce, ...); Registry holds names, ids, groups and
#    ports; StateStore and StateJournal keep the saved list (synced before the API answers);
#    MetricsLoop samples /proc; Supervisor wires them and is what the API calls. Raises domain
#    errors; knows no HTTP.
# ==============================================================================================

# -- restart policy: pure decisions, tested directly -------------------------------------------

class ExitDecision(NamedTuple):
    action: str            # "restart", "stop" or "errored"
    delay_ms: int
    unstable_restarts: int
    backoff_count: int
    reason: str


def restart_delay(config: ProcessConfig, backoff_count: int) -> int:
    """Milliseconds to wait before the next automatic restart."""
    if config.exp_backoff_restart_delay:
        grown = config.exp_backoff_restart_delay * BACKOFF_FACTOR ** max(0, backoff_count - 1)
        return int(min(BACKOFF_MAX_MS, grown))
    return config.restart_delay


def decide_after_exit(config: ProcessConfig, exit_code: Optional[int], uptime_ms: int,
                      unstable_restarts: int, backoff_count: int) -> ExitDecision:
    """What to do when a process exits on its own: restart (after how long), stop, or give up."""
    if exit_code is not None and exit_code in config.stop_exit_codes:
        return ExitDecision("stop", 0, 0, 0, "exit code %d is in stop_exit_codes" % exit_code)
    if not config.autorestart:
        return ExitDecision("stop", 0, 0, 0, "autorestart is off")
    # An exit before min_uptime is unstable; unstable exits in a row are what max_restarts caps.
    unstable = unstable_restarts + 1 if uptime_ms < config.min_uptime else 0
    if unstable > config.max_restarts:
        return ExitDecision("errored", 0, unstable, backoff_count,
                            "exited %d times in a row before min_uptime (%d ms); max_restarts is %d"
                            % (unstable, config.min_uptime, config.max_restarts))
    backoff = backoff_count + 1 if uptime_ms < BACKOFF_RESET_UPTIME_MS else 1
    return ExitDecision("restart", restart_delay(config, backoff), unstable, backoff, "")


# -- names and ports of instances (a port is free: a bind, tried) ------------------------------

def member_name(base: str, index: int, instances: int) -> str:
    """A group of N > 1 instances is named base-0 ... base-(N-1); a single one keeps base."""
    return base if instances == 1 else "%s-%d" % (base, index)


def port_bounds(spec: str) -> Tuple[int, int, bool]:
    """(low, high, auto) of a normalised port value from parse_port_value."""
    auto = spec.startswith("auto")
    body = spec[5:] if spec.startswith("auto:") else ("3000-65535" if auto else spec)
    low, _, high = body.partition("-")
    return int(low), int(high or low), auto


def port_is_free(port: int) -> bool:
    """True when nothing on this host listens on the port (checked by binding it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def assign_ports(spec: Optional[str], instances: int, taken: set,
                 keep: Optional[Dict[int, int]] = None) -> List[Optional[int]]:
    """One port per instance index: a single port counts up, a range must be large enough,
    "auto" takes free ones. keep maps an index to the port it has and keeps (scaling)."""
    if spec is None:
        return [None] * instances
    keep = keep or {}
    low, high, auto = port_bounds(spec)
    if not auto:
        if low == high and "-" not in spec:
            high = low + instances - 1
        if high - low + 1 < instances:
            raise invalid_field("port", "port range %r holds %d port(s) but instances is %d"
                                % (spec, high - low + 1, instances))
        ports = list(range(low, low + instances))
        clash = [port for port in ports if port in taken]
        if clash or ports[-1] > 65535:
            raise PortConflict("port %d is already used by another managed process"
                               % (clash[0] if clash else ports[-1]), {"port": spec})
        return ports
    kept = {index: port for index, port in keep.items() if index < instances and low <= port <= high}
    ports, candidates = [], (port for port in range(low, high + 1)
                             if port not in taken and port not in kept.values())
    for index in range(instances):
        port = kept.get(index)
        if port is None:
            port = next((port for port in candidates if port_is_free(port)), None)
            if port is None:
                raise PortConflict("no %d free port(s) in %d-%d" % (instances - len(kept), low, high),
                                   {"port": spec})
        ports.append(port)
    return ports


# -- what a child starts with: its environment and argv ----------------------------------------

def child_base_environment(environ: Dict[str, str]) -> Dict[str, str]:
    """The daemon's environment minus its secrets: what every child inherits."""
    return {key: value for key, value in environ.items() if key not in SECRET_ENV_NAMES}


def build_argv(config: ProcessConfig, env: Dict[str, str]) -> List[str]:
    """The argv to exec: the script directly (found like a shell would), or sh -c when asked."""
    if config.shell:
        return ["/bin/sh", "-c", " ".join([config.script] + [shlex.quote(a) for a in config.args])]
    if config.interpreter:
        # The script is the interpreter's argument: it need not be executable, only there.
        interpreter = config.interpreter if "/" in config.interpreter else \
            shutil.which(config.interpreter, path=env.get("PATH", os.defpath))
        if interpreter is None or not os.access(interpreter, os.X_OK):
            raise SpawnError("interpreter %r not found or not executable" % config.interpreter)
        path = os.path.join(config.cwd or ".", config.script)
        if not os.path.isfile(path):
            raise SpawnError("script %r does not exist" % path)
        return [interpreter] + list(config.interpreter_args) + [path] + list(config.args)
    script = config.script
    if "/" in script:
        path = os.path.join(config.cwd or ".", script)
    else:
        path = shutil.which(script, path=env.get("PATH", os.defpath))
        local = os.path.join(config.cwd or ".", script)
        if path is None and os.path.isfile(local):
            raise SpawnError("script %r is not an executable on PATH; use \"./%s\", or set script "
                             "to its interpreter and put the file in args" % (script, script))
        if path is None:
            raise SpawnError("command %r not found in PATH" % script)
    if not os.path.isfile(path):
        raise SpawnError("script %r does not exist" % path)
    if not os.access(path, os.X_OK):
        raise SpawnError("script %r is not executable (chmod +x, or run it through an "
                         "interpreter)" % path)
    return [path] + list(config.args)


# -- health checks: HTTP, TCP and script probes, and their state -------------------------------

@record
class HealthState:
    """Results of a process's health checks: unknown -> healthy / unhealthy (after retries)."""
    status: str = "none"                  # "none" when no check is configured
    last_check: Optional[float] = None    # wall time
    total: int = 0
    successful: int = 0
    consecutive_failures: int = 0
    last_error: Optional[str] = None
    last_duration: Optional[float] = None   # seconds the last check took

    def reset(self, enabled: bool) -> None:
        """A new run starts with an unknown health (counters are kept for success_rate)."""
        self.status = "unknown" if enabled else "none"
        self.consecutive_failures = 0

    def record(self, error: Optional[str], wall: float, retries: int, may_fail: bool = True) -> Optional[str]:
        """Record one result (error None = healthy); return the new status if it changed."""
        self.total += 1
        self.last_check = wall
        if error is None:
            self.successful += 1
            self.consecutive_failures, self.last_error = 0, None
            new_status = "healthy"
        else:
            self.consecutive_failures += 1
            self.last_error = error
            failed = may_fail and self.consecutive_failures >= retries
            new_status = "unhealthy" if failed else self.status
        changed = new_status != self.status
        self.status = new_status
        return new_status if changed else None

    def to_api(self, check: Optional[dict], url: Optional[str]) -> dict:
        return {"status": self.status,
                "last_check": iso_time(self.last_check) if self.last_check else None,
                "check_type": check["type"] if check else None, "url": url,
                "success_rate": round(100.0 * self.successful / self.total, 1) if self.total else None,
                "total_checks": self.total, "successful_checks": self.successful,
                "consecutive_failures": self.consecutive_failures, "last_error": self.last_error,
                "enabled": bool(check and check["enabled"]),
                "interval": check["interval"] if check else None,
                "retries": check["retries"] if check else None}


def health_target(check: dict, port: Optional[int]) -> Optional[str]:
    """What a check probes, for display: the URL, host:port, or the script."""
    if check["type"] == "http":
        return check["url"].replace("{port}", str(port))
    if check["type"] == "tcp":
        return "%s:%s" % (check["host"], check["port"] or port)
    return check["script"]


async def run_health_check(check: dict, port: Optional[int], config: ProcessConfig,
                           env: Dict[str, str]) -> Optional[str]:
    """Run one check within its timeout; None when healthy, else why not."""
    probe = {"http": _check_http, "tcp": _check_tcp, "script": _check_script}[check["type"]]
    try:
        return await asyncio.wait_for(probe(check, port, config, env), check["timeout"] / 1000)
    except asyncio.TimeoutError:
        return "no answer within %d ms" % check["timeout"]
    except Exception as exc:    # whatever the probed program does, it is a failed check
        return "%s: %s" % (type(exc).__name__, exc)


async def _check_http(check: dict, port: Optional[int], config: ProcessConfig, env) -> Optional[str]:
    """A real HTTP GET; any 2xx status is healthy."""
    url = health_target(check, port)
    parts = urllib.parse.urlsplit(url)
    secure = parts.scheme == "https"
    context = None
    if secure:
        import ssl
        context = ssl.create_default_context()
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or (443 if secure else 80),
                                                   ssl=context)
    try:
        path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        writer.write(("GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: pmdaemon/%s\r\nAccept: */*\r\n"
                      "Connection: close\r\n\r\n" % (path, parts.netloc, __version__)).encode("latin-1"))
        line = await reader.readline()
    finally:
        writer.close()
    match = re.match(rb"HTTP/1\.[01] ([0-9]{3})", line[:MAX_HEALTH_RESPONSE_LINE])
    if not match:
        return "not an HTTP response: %r" % line[:60]
    status = int(match.group(1))
    return None if 200 <= status < 300 else "HTTP status %d" % status


async def _check_tcp(check: dict, port: Optional[int], config: ProcessConfig, env) -> Optional[str]:
    """Healthy when a TCP connection is accepted."""
    _, writer = await asyncio.open_connection(check["host"], check["port"] or port)
    writer.close()
    return None


async def _check_script(check: dict, port: Optional[int], config: ProcessConfig, env) -> Optional[str]:
    """Healthy when the script exits 0; it runs with the process's cwd, environment and user."""
    cwd, setup = config.cwd, child_setup(config, (), config.cwd)
    script = check["script"]
    path = script if "/" in script else shutil.which(script, path=env.get("PATH", os.defpath))
    if path is None:
        return "command %r not found in PATH" % script
    proc = await asyncio.create_subprocess_exec(
        os.path.join(cwd or ".", path), *check["args"], cwd=child_cwd(config, cwd), env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, start_new_session=True, **({"preexec_fn": setup} if setup else {}))
    try:
        output = await read_tail(proc.stderr, HEALTH_OUTPUT_TAIL)
        await proc.wait()
    except asyncio.CancelledError:
        if proc.returncode is None:             # unreaped: its group id is still its own
            signal_group(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    if proc.returncode == 0:
        return None
    detail = output[-HEALTH_ERROR_CHARS:].decode("utf-8", "replace").strip()
    return "exit code %d%s" % (proc.returncode, ": " + detail if detail else "")


async def read_tail(stream: asyncio.StreamReader, keep: int) -> bytes:
    """Read a stream to its end, keeping only its last `keep` bytes: a check script that
    writes without end costs a read chunk and the tail, never more."""
    tail = b""
    while True:
        chunk = await stream.read(READ_CHUNK)
        if not chunk:
            return tail
        tail = (tail + chunk)[-keep:]


# -- stopping: process groups, what escaped them, pids that change hands -----------------------

def signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def group_alive(pgid: int, sampler: Sampler) -> bool:
    """True while a live (non-zombie) process is in the group. Zombies count for killpg, and an
    init that does not reap (some containers) would otherwise make every stop wait in vain."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        table = sampler.scan()
    except OSError:                             # out of descriptors: killpg's word stands
        return True
    members = [pid for pid, stat in table.items() if stat.pgid == pgid]
    sampler.fresh(table, members)               # each member's state and group as they are now
    return any(pid in table and table[pid].pgid == pgid and table[pid].state != "Z" for pid in members)


def open_pidfd(pid: int) -> Optional[int]:
    """A pidfd naming the process that has `pid` now (Python 3.9+, Linux 5.3+), else None."""
    if not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(pid)               # novermin (checked above)
    except OSError:
        return None


def signal_exactly(pid: int, start_ticks: int, signum: int, sampler: Sampler) -> bool:
    """Signal the process that (pid, start_ticks) names, never one that got its pid since: the
    pidfd is opened before the start time is checked, so what was checked is what is
    signalled. Without pidfd (Python 3.6-3.8, Linux < 5.3) a pid reused between the check and
    the kill is the residual risk. signum 0 only asks. True when it was alive (not a zombie)."""
    pidfd = open_pidfd(pid)
    try:
        stat = sampler.stat(pid)
        if stat is None or stat.start_ticks != start_ticks or stat.state == "Z":
            return False
        if signum:
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, signum)    # novermin
            else:
                os.kill(pid, signum)
        return True
    except (ProcessLookupError, PermissionError):
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _signal_escaped(escaped: List[Tuple[int, int]], signum: int, sampler: Sampler) -> List[Tuple[int, int]]:
    """Signal each (pid, start_ticks) still alive as that same process; return those alive."""
    return [(pid, start_ticks) for pid, start_ticks in escaped if signal_exactly(pid, start_ticks, signum, sampler)]


def group_members(sampler: Sampler, pgid: int, since_ticks: Optional[int]) -> List[Tuple[int, int]]:
    """(pid, start) of the live members of a group whose leader is gone, to be signalled one by
    one. Its id may be given to a new process only once no member is left: a live process
    with that very pid means the group is someone else's now, and none is ours. An empty
    group (the usual end of a stop) is known without listing /proc."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    except PermissionError:
        pass                                    # a member of someone else's: the listing tells
    table = sampler.scan(reuse_within=SCAN_REUSE_WINDOW)
    members = [pid for pid, stat in table.items() if stat.pgid == pgid or pid == pgid]
    sampler.fresh(table, members)
    if pgid in table and table[pgid].state != "Z":
        return []
    return [(pid, table[pid].start_ticks) for pid in members
            if pid in table and table[pid].pgid == pgid and table[pid].state != "Z"
            and (since_ticks is None or table[pid].start_ticks >= since_ticks)]


async def terminate_group(pgid: Optional[int], escaped: List[Tuple[int, int]], signum: int,
                          timeout: float, wait_leader, sampler: Sampler,
                          kill_grace: float = KILL_GRACE, poll_interval: float = STOP_POLL_INTERVAL,
                          leader_unreaped: Callable[[], bool] = lambda: True,
                          since_ticks: Optional[int] = None) -> bool:
    """Stop a group and escapees: signum now, SIGKILL at timeout; True once all are gone.
    The group is signalled by its id only while its leader is unreaped (leader_unreaped):
    after, its members are signalled one by one as the processes they are."""
    def group_id() -> Optional[int]:
        nonlocal pgid, escaped
        if pgid is not None and not leader_unreaped():
            escaped = sorted(set(escaped) | set(group_members(sampler, pgid, since_ticks)))
            pgid = None
        return pgid
    if group_id() is not None:
        signal_group(pgid, signum)
    _signal_escaped(escaped, signum, sampler)
    loop = asyncio.get_event_loop()
    deadline = loop.time() + timeout
    killed = False
    if wait_leader is not None:
        try:
            await asyncio.wait_for(wait_leader(), timeout)
        except asyncio.TimeoutError:
            pass
    while True:
        alive = group_id() is not None and group_alive(pgid, sampler)
        remaining = _signal_escaped(escaped, 0, sampler)
        if not alive and not remaining:
            return True
        if not killed and loop.time() >= deadline:
            if group_id() is not None:
                signal_group(pgid, signal.SIGKILL)
            _signal_escaped(remaining, signal.SIGKILL, sampler)
            killed = True
            if wait_leader is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wait_leader(), kill_grace)
            deadline = loop.time() + kill_grace
        elif killed and loop.time() >= deadline:
            log.warning("process group %s still has members after SIGKILL", pgid)
            return False
        await asyncio.sleep(poll_interval)


# -- watch: the files a process depends on -----------------------------------------------------

def file_snapshot(roots: List[str], ignore: List[str], limit: int = WATCH_MAX_FILES,
                  max_dirs: int = WATCH_MAX_DIRS) -> Dict[str, Tuple[int, int]]:
    """(mtime in ns, size) of every file under roots whose name or relative path matches no
    ignore pattern. Links are not followed. ValueError past `limit` files or `max_dirs`
    directories: a directory costs a scan each time even when it is empty."""
    import fnmatch
    found: Dict[str, Tuple[int, int]] = {}
    stack = list(roots)
    scanned = 0
    while stack:
        path = stack.pop()
        try:
            entries = list(os.scandir(path)) if os.path.isdir(path) and not os.path.islink(path) else None
        except OSError:
            continue
        if entries is not None:
            scanned += 1
            if scanned > max_dirs:
                raise ValueError("more than %d directories to watch" % max_dirs)
        if entries is None:
            with contextlib.suppress(OSError):
                info = os.lstat(path)
                found[path] = (info.st_mtime_ns, info.st_size)
            continue
        for entry in entries:
            if any(fnmatch.fnmatch(entry.name, pattern) for pattern in ignore):
                continue
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            elif len(found) >= limit:
                raise ValueError("more than %d files to watch" % limit)
            else:
                with contextlib.suppress(OSError):
                    info = entry.stat(follow_symlinks=False)
                    found[entry.path] = (info.st_mtime_ns, info.st_size)
    return found


# -- cgroups: hard memory and CPU caps ---------------------------------------------------------

class Cgroups:
    """Hard memory and CPU caps for a process tree, one cgroup per process: cgroup v2 where
    the daemon's own cgroup is delegated to it (the daemon moves itself into a leaf, as v2
    wants), else the v1 memory and cpu controllers as root. `usable` is None when neither
    can be written, with `why` saying so. Cgroups are named by process id, so a restarted
    daemon reuses them; they are removed with their process."""

    def __init__(self, home: str, root: str = "/sys/fs/cgroup", proc_self: str = "/proc/self/cgroup"):
        self.why = "no writable cgroup hierarchy"
        self.usable: Optional[str] = None
        self.places: Dict[str, str] = {}        # controller -> directory holding our cgroups
        self.tag = "pmdaemon-" + hashlib.sha256(home.encode()).hexdigest()[:8]
        with contextlib.suppress(OSError):
            self._find(root, proc_self)

    def _find(self, root: str, proc_self: str) -> None:
        with open(proc_self) as handle:
            lines = [line.strip().split(":", 2) for line in handle if line.count(":") >= 2]
        v1 = {controller: path for _, controllers, path in lines for controller in controllers.split(",") if controller}
        if os.path.exists(os.path.join(root, "memory", "memory.limit_in_bytes")) and "memory" in v1 and "cpu" in v1:
            places = {name: os.path.join(root, name, v1[name].lstrip("/"), self.tag) for name in ("memory", "cpu")}
            for place in places.values():
                os.makedirs(place, exist_ok=True)
            self.places, self.usable = places, "v1"
            return
        own = next((path for number, controllers, path in lines if number == "0" and not controllers), None)
        base = os.path.join(root, own.lstrip("/")) if own is not None else None
        if base and os.path.exists(os.path.join(base, "cgroup.subtree_control")):
            with open(os.path.join(base, "cgroup.controllers")) as handle:
                available = handle.read().split()
            if not {"memory", "cpu"} <= set(available):
                self.why = "the daemon's cgroup %s does not offer memory and cpu (delegate them)" % base
                return
            leaf = os.path.join(base, "daemon")      # v2: no processes in a cgroup with children
            os.makedirs(leaf, exist_ok=True)
            with open(os.path.join(leaf, "cgroup.procs"), "w") as handle:
                handle.write(str(os.getpid()))
            with open(os.path.join(base, "cgroup.subtree_control"), "w") as handle:
                handle.write("+memory +cpu")
            self.places, self.usable = {"memory": base, "cpu": base}, "v2"

    def paths(self, process_id: int) -> List[str]:
        return sorted({os.path.join(place, "proc-%d" % process_id) for place in self.places.values()})

    def prepare(self, process_id: int, memory: Optional[int], cpu_percent: Optional[int]) -> List[str]:
        """Create (or reuse) the process's cgroup(s) and write its limits; the cgroup.procs files
        a child writes its pid to before exec."""
        if not self.usable:
            raise CannotStart("cgroup limits cannot be applied: %s" % self.why)
        for path in self.paths(process_id):
            os.makedirs(path, exist_ok=True)
        memory_dir = os.path.join(self.places["memory"], "proc-%d" % process_id)
        cpu_dir = os.path.join(self.places["cpu"], "proc-%d" % process_id)
        if self.usable == "v2":
            self._write(memory_dir, "memory.max", str(memory) if memory else "max")
            self._write(cpu_dir, "cpu.max", "%d 100000" % (cpu_percent * 1000) if cpu_percent else "max 100000")
        else:
            self._write(memory_dir, "memory.limit_in_bytes", str(memory) if memory else "-1")
            self._write(cpu_dir, "cpu.cfs_period_us", "100000")
            self._write(cpu_dir, "cpu.cfs_quota_us", str(cpu_percent * 1000) if cpu_percent else "-1")
        return [os.path.join(path, "cgroup.procs") for path in self.paths(process_id)]

    @staticmethod
    def _write(directory: str, name: str, value: str) -> None:
        with open(os.path.join(directory, name), "w") as handle:
            handle.write(value)

    def remove(self, process_id: int) -> None:
        for path in self.paths(process_id):
            with contextlib.suppress(OSError):
                os.rmdir(path)

    def remove_all(self) -> None:
        """At shutdown, once every child is gone: every process's cgroup, and v1's directories
        of ours (v2's "daemon" leaf holds the daemon itself; its service's cgroup goes with it)."""
        for place in set(self.places.values()):
            with contextlib.suppress(OSError):
                for entry in os.scandir(place):
                    if entry.name.startswith("proc-") and entry.is_dir(follow_symlinks=False):
                        with contextlib.suppress(OSError):
                            os.rmdir(entry.path)
            if self.usable == "v1":
                with contextlib.suppress(OSError):
                    os.rmdir(place)


# -- one run of a program, and the default spawner ---------------------------------------------

def wait_for_exit(pid: int, block: bool = True) -> Tuple[bool, Optional[int]]:
    """Reap our child `pid`: (whether it was reaped, its exit status as a returncode, -N for
    signal N, or None if it was reaped elsewhere and its status is lost). Without blocking,
    (False, None) while it cannot be reaped yet."""
    try:
        reaped, status = os.waitpid(pid, 0 if block else os.WNOHANG)
    except ChildProcessError:
        return True, None
    if reaped == 0:
        return False, None
    return True, -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


class PidfdWatcher:
    """The event loop's child watcher (asyncio asks it to watch each child it starts): a pidfd
    per child, readable in the loop once the child exits, then reaped, as asyncio's own
    PidfdChildWatcher does. The differences: the pidfd is lent to the run of a managed process
    (lend), which signals through it, so a process costs one pidfd and not two; at 5,000
    processes that is 5,000 descriptors. A lent pidfd is closed by the last of the two to let
    go: the watcher at the reap, or the run (give_back). And the reap never blocks: a child
    that someone ptraces exits readable but can be reaped only once its tracer lets go, and
    a hostile app must not stop the loop that way. Installed by the daemon where pidfd_open
    works (watch_children_by_pidfd): it watches our children (watch_exit) on 3.9+, and is
    asyncio's watcher, for the health checks' children, up to 3.13."""

    installed: Optional["PidfdWatcher"] = None

    def __init__(self):
        self._watched: Dict[int, int] = {}      # pid -> its pidfd, until reaped
        self._lent: set = set()                 # pidfds a run holds
        self._lent_reaped: set = set()          # ... whose child was reaped: the run closes them

    def add_child_handler(self, pid: int, callback: Callable, *args) -> None:
        """asyncio's children (health checks): callback(pid, returncode, *args) once reaped."""
        self.watch(pid, callback, None, *args)

    def watch(self, pid: int, callback: Callable, pidfd: Optional[int] = None, *args) -> None:
        """Ours: a pidfd is opened, or `pidfd`, handed over in an upgrade, taken as already lent."""
        opened = pidfd is None
        if opened:
            pidfd = os.pidfd_open(pid)          # novermin (installed only where it works)
        loop = asyncio.get_event_loop()
        try:
            loop.add_reader(pidfd, self._reap, loop, pid, pidfd, callback, args)
        except BaseException:
            if opened:
                os.close(pidfd)
            raise
        self._watched[pid] = pidfd
        if not opened:
            self._lent.add(pidfd)

    def _reap(self, loop, pid: int, pidfd: int, callback: Callable, args: tuple) -> None:
        loop.remove_reader(pidfd)
        reaped, returncode = wait_for_exit(pid, block=False)
        if not reaped:                          # a tracer holds it: look again in a while
            loop.call_later(TRACED_REAP_RETRY, self._reap, loop, pid, pidfd, callback, args)
            return
        del self._watched[pid]
        if returncode is None:
            returncode = 255                    # asyncio's word for a status that was lost
        if pidfd in self._lent:
            self._lent_reaped.add(pidfd)
        else:
            os.close(pidfd)
        callback(pid, returncode, *args)

    def lend(self, pid: int) -> Optional[int]:
        pidfd = self._watched.get(pid)
        if pidfd is not None:
            self._lent.add(pidfd)
        return pidfd

    def give_back(self, pidfd: int) -> bool:
        """False if the pidfd was not lent by us (the caller closes it)."""
        if pidfd not in self._lent:
            return False
        self._lent.discard(pidfd)
        if pidfd in self._lent_reaped:
            self._lent_reaped.discard(pidfd)
            os.close(pidfd)                     # already reaped: nobody else holds it
        return True

    # The rest of asyncio's AbstractChildWatcher interface (3.6-3.13).
    def remove_child_handler(self, pid: int) -> bool:
        return True

    def attach_loop(self, loop) -> None:
        pass

    def is_active(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def __enter__(self) -> "PidfdWatcher":
        return self

    def __exit__(self, *exc_info) -> None:
        pass


def pidfd_of_child(pid: int) -> Optional[int]:
    """A pidfd naming our child `pid`, for a run to hold until release_pidfd: the one the
    loop's watcher has, lent; None if the watcher has already reaped it (a child that exited
    at once: its pid may be someone else's by now, so none is opened); a new one where no
    watcher of ours runs (a kernel without pidfd_open, where this opens none either)."""
    watcher = PidfdWatcher.installed
    if watcher is not None:
        return watcher.lend(pid)
    return open_pidfd(pid)


def release_pidfd(pidfd: int) -> None:
    watcher = PidfdWatcher.installed
    if watcher is None or not watcher.give_back(pidfd):
        os.close(pidfd)


class Run:
    """One execution of a process's program. Exits and timers carry the run they belong to, so
    an event of a run that was already replaced is recognised (run is not runner.run) and
    ignored in one place."""
    __slots__ = ("token", "proc", "pid", "start_ticks", "started_at", "started_wall",
                 "stop_requested", "watch", "env", "pidfd", "pumps", "handed_over")

    def __init__(self, token: Optional[str], pid: Optional[int] = None, start_ticks: Optional[int] = None):
        self.token = token
        self.proc: Any = None
        self.pid = pid
        self.start_ticks = start_ticks
        self.started_at = 0.0                   # monotonic, for uptime
        self.started_wall: Optional[float] = None
        self.stop_requested = False             # an exit we asked for: no restart decision
        self.watch: Optional[asyncio.Task] = None   # what handles its exit, once it has exited
        self.env: Dict[str, str] = {}           # what the child got beside the daemon's environment
        self.pidfd: Optional[int] = None        # names the main process, whatever gets its pid later
        self.pumps: list = []                   # when its output pumps have written all (futures)
        self.handed_over = False                # to the next image (upgrade): its exit is not ours

    async def exited(self) -> int:
        """The main process's exit status, as soon as it has exited (Child)."""
        return await asyncio.shield(self.proc.exited)

    def leader_unreaped(self) -> bool:
        """Whether the main process still holds its pid, alive or a zombie. While it does, no
        other process can be given that pid, nor its group's id (the same number): a signal
        by pid or by group reaches what we started."""
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, 0)    # novermin (pidfd only where 3.9+)
                return True
            except ProcessLookupError:
                return False
            except OSError:
                pass
        elif PidfdWatcher.installed is not None:
            return False            # our watcher had reaped it before the run could hold its pidfd
        return self.proc is not None and self.proc.returncode is None

    def signal(self, signum: int) -> bool:
        """Signal the main process, never one that got its pid later; False once it is gone."""
        if not self.leader_unreaped():
            return False
        with contextlib.suppress(ProcessLookupError):
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signum)   # novermin
            else:
                os.kill(self.pid, signum)
        return True

    def close(self) -> None:
        if self.pidfd is not None:
            release_pidfd(self.pidfd)
            self.pidfd = None


class Child:
    """A child of the daemon, started by spawn_child or handed over by the previous image in
    an upgrade (adopt_child): its pid; `exited`, done with its exit status once it is reaped;
    its stdin (a StreamWriter, None without "stdin": true) and its stdout and stderr
    (OutputPump, each reading its pipe in the loop). No subprocess transport of asyncio's: its
    transports, protocols and futures cost 5 KB a process, at a thousand processes 5 MB."""
    __slots__ = ("pid", "returncode", "stdin", "stdout", "stderr", "exited")

    def __init__(self, pid: int, loop):
        self.pid = pid
        self.returncode: Optional[int] = None
        self.stdin: Optional[asyncio.StreamWriter] = None
        self.stdout: Optional[OutputPump] = None
        self.stderr: Optional[OutputPump] = None
        self.exited = loop.create_future()

    def reaped(self, pid: int, returncode: Optional[int]) -> None:
        """The child watcher's word (see watch_exit); the status of a child reaped elsewhere is
        lost (None, or 255 from PidfdWatcher, as asyncio says it)."""
        if self.returncode is None:
            self.returncode = returncode
        if not self.exited.done():
            self.exited.set_result(self.returncode)

    def descriptors(self) -> List[Optional[int]]:
        """The pipes still open, as descriptors (stdin's write end, stdout's and stderr's read
        ends), for the next image in an upgrade; None where there is none."""
        stdin = None
        if self.stdin is not None and not self.stdin.transport.is_closing():
            stdin = self.stdin.transport.get_extra_info("pipe").fileno()
        return [stdin] + [pump.fd if pump is not None else None for pump in (self.stdout, self.stderr)]

    def close_pipes(self) -> None:
        """Let go of every pipe (a child that could not be taken on after all)."""
        if self.stdin is not None:
            self.stdin.transport.close()
        for pump in (self.stdout, self.stderr):
            if pump is not None and pump.fd is not None:
                pump.stop_reading()
                os.close(pump.fd)
                pump.fd = None


def abandon_child(pid: int, retry_in: float = 0.01) -> None:
    """A child of ours that could not be taken on (out of descriptors, cancelled) must not run
    on unseen, nor stay a zombie: its group is killed and it is reaped here, without ever
    blocking the loop (it takes a moment to die; a ptraced one dies when its tracer lets go)."""
    signal_group(pid, signal.SIGKILL)
    if not wait_for_exit(pid, block=False)[0]:
        asyncio.get_event_loop().call_later(retry_in, abandon_child, pid, min(retry_in * 2, TRACED_REAP_RETRY))


async def spawn_child(argv: List[str], cwd: Optional[str], env: Dict[str, str], config: ProcessConfig,
                      cgroup_procs: List[str] = ()) -> Child:
    """Start a child in its own session and process group (pgid == pid), output piped to us,
    stdin a pipe when asked for; its cgroups, umask, rlimits and user set between fork and exec."""
    setup = child_setup(config, cgroup_procs, cwd)
    theirs: List[int] = []                      # the child's ends, closed here once it has them
    ours: List[Optional[int]] = [None, None, None]
    try:
        if config.stdin:
            stdin, ours[0] = os.pipe()
            theirs.append(stdin)
        else:
            stdin = subprocess.DEVNULL
        for index in (1, 2):
            ours[index], write_end = os.pipe()
            theirs.append(write_end)
        popen = subprocess.Popen(argv, stdin=stdin, stdout=theirs[-2], stderr=theirs[-1],
                                 cwd=child_cwd(config, cwd), env=env, start_new_session=True,
                                 **({"preexec_fn": setup} if setup else {}))
    except BaseException:
        for descriptor in ours:
            if descriptor is not None:
                os.close(descriptor)
        raise
    finally:
        for descriptor in theirs:
            os.close(descriptor)
    # The loop's watcher reaps it (watch_exit), never subprocess's own clean-up of dropped
    # Popen objects, which would take its exit status from us.
    popen._child_created = False
    try:
        return await adopt_child(popen.pid, None, ours, [b"", b"", b""])
    except BaseException:
        abandon_child(popen.pid)
        raise


async def adopt_child(pid: int, pidfd: Optional[int], descriptors: List[Optional[int]],
                      carried: List[bytes], returncode: Optional[int] = None) -> Child:
    """A Child from its pid and its pipes' descriptors (stdin, stdout, stderr; None where there
    is no pipe), which it owns from now on: one we have just started, or one the previous
    image handed over in an upgrade (exec kept our pid, so it is still our child), with its
    pidfd, `carried`, what was read of each output but not logged, and `returncode` if it was
    reaped before the exec. If this fails (out of descriptors, cancelled), every pipe given
    is closed and nothing watches the child (see abandon_child); the pidfd stays the caller's."""
    loop = asyncio.get_event_loop()
    child = Child(pid, loop)
    waiting = list(descriptors)                 # not yet held by a pipe of the child's
    stdin_file = None
    try:
        for index in (1, 2):
            if waiting[index] is None:
                continue
            pump = OutputPump(loop)
            if carried[index]:
                pump.feed_data(carried[index])  # the start of a line the previous image read
            pump.read_pipe(waiting[index])
            waiting[index] = None
            setattr(child, ("stdout", "stderr")[index - 1], pump)
        if waiting[0] is not None:
            stdin_file, waiting[0] = os.fdopen(waiting[0], "wb", buffering=0), None
            transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, stdin_file)
            child.stdin = asyncio.StreamWriter(transport, protocol, None, loop)
        if returncode is not None:
            child.reaped(pid, returncode)
        else:
            watch_exit(child, pidfd)
    except BaseException:
        child.close_pipes()
        if child.stdin is None and stdin_file is not None:
            stdin_file.close()
        for descriptor in waiting:
            if descriptor is not None:
                os.close(descriptor)
        raise
    return child


def watch_exit(child: Child, pidfd: Optional[int] = None) -> None:
    """child.exited is done once the child is reaped, by what reaps children here: our
    PidfdWatcher where pidfd_open works (3.9+; a pidfd handed over in an upgrade is taken as
    the run's), else asyncio's watcher (3.6-3.8, or an old kernel), else a thread waiting for
    it (3.14+ on an old kernel, where asyncio has no watcher to lend)."""
    watcher = PidfdWatcher.installed
    if watcher is not None:
        watcher.watch(child.pid, child.reaped, pidfd)
        return
    loop = asyncio.get_event_loop()

    def reaped_elsewhere(pid: int, returncode: Optional[int]) -> None:
        loop.call_soon_threadsafe(child.reaped, pid, returncode)
    if hasattr(asyncio, "get_child_watcher"):
        with warnings.catch_warnings():     # 3.12+ deprecates the watcher; pidfd is used there
            warnings.simplefilter("ignore", DeprecationWarning)
            asyncio.get_child_watcher().add_child_handler(child.pid, reaped_elsewhere)
    else:
        import threading
        threading.Thread(target=lambda: reaped_elsewhere(child.pid, wait_for_exit(child.pid)[1]),
                         name="waitpid-%d" % child.pid, daemon=True).start()


class Identity(NamedTuple):
    """Who a child runs as (user/group): ids, supplementary groups, its HOME and names."""
    uid: int
    gid: int
    groups: List[int]
    name: str
    home: str


def resolve_identity(config: ProcessConfig, daemon_uid: Optional[int] = None) -> Optional[Identity]:
    """The user and group a process asks for, checked: the daemon must be root (only root can
    become someone else) and both must exist. ValidationError names what is wrong."""
    if config.user is None and config.group is None:
        return None
    daemon_uid = os.geteuid() if daemon_uid is None else daemon_uid
    field = "user" if config.user is not None else "group"
    if daemon_uid != 0:
        raise invalid_field(field, "running a process as another %s needs the daemon to run as root" % field)
    import grp
    import pwd
    try:
        who = pwd.getpwnam(config.user) if config.user and not config.user.isdigit() else \
            pwd.getpwuid(int(config.user) if config.user else daemon_uid)
    except KeyError:
        raise invalid_field("user", "no such user %r" % config.user) from None
    try:
        group = grp.getgrnam(config.group) if config.group and not config.group.isdigit() else \
            grp.getgrgid(int(config.group) if config.group else who.pw_gid)
    except KeyError:
        raise invalid_field("group", "no such group %r" % config.group) from None
    groups = os.getgrouplist(who.pw_name, group.gr_gid) if config.user else [group.gr_gid]
    return Identity(who.pw_uid, group.gr_gid, groups, who.pw_name, who.pw_dir)


def child_setup(config: ProcessConfig, cgroup_procs: List[str] = (),
                cwd: Optional[str] = None) -> Optional[Callable[[], None]]:
    """What runs in the child before exec (nothing when nothing is asked for: preexec_fn has
    a cost). Only system calls: no allocation-heavy work between fork and exec. For a process
    that runs as another user, its cwd is entered here, after the drop to that user: entered
    by the daemon (root), it would follow links that user controls into what only root may read
    (so such a child is spawned without cwd=; see child_cwd)."""
    identity = resolve_identity(config)
    if config.umask is None and not config.rlimits and identity is None and not cgroup_procs:
        return None
    import resource
    limits = [(getattr(resource, "RLIMIT_" + name.upper()),
               tuple(resource.RLIM_INFINITY if value == -1 else value for value in pair))
              for name, pair in config.rlimits.items() if hasattr(resource, "RLIMIT_" + name.upper())]
    umask = config.umask

    def setup() -> None:
        for path in cgroup_procs:           # first: everything the child starts is capped too
            descriptor = os.open(path, os.O_WRONLY)
            os.write(descriptor, b"0")      # "0": the writing process itself
            os.close(descriptor)
        if umask is not None:
            os.umask(umask)
        for which, pair in limits:
            resource.setrlimit(which, pair)
        if identity is not None:            # last: the limits above may need root
            become(identity)
            if cwd is not None:
                os.chdir(cwd)
    return setup


def child_cwd(config: ProcessConfig, cwd: Optional[str]) -> Optional[str]:
    """The cwd to hand to subprocess: none for a process that runs as another user, whose
    child_setup enters it with that user's rights."""
    return cwd if config.user is None and config.group is None else None


def spawn_failure(config: ProcessConfig, exc: Exception) -> str:
    """Why a start failed, in the words an operator can act on."""
    if isinstance(exc, PMDaemonError):
        return str(exc)
    if isinstance(exc, subprocess.SubprocessError):     # child_setup raised: its cwd, user or limits
        return "cannot start %r: the child could not enter its cwd %r as user %r or set its limits" % (
            config.script, config.cwd, config.user)
    return "cannot execute %r: %s" % (config.script, exc.strerror or exc if isinstance(exc, OSError) else exc)


def become(identity: Identity) -> None:
    """Between fork and exec: drop to a user's groups, group and uid (in that order)."""
    os.setgroups(identity.groups)
    os.setgid(identity.gid)
    os.setuid(identity.uid)


def reach_env_file(path: str, owners: frozenset) -> int:
    """An O_PATH descriptor of env_file: reached without a link, a regular file with one link
    (opening it this way reads nothing and cannot wait on a FIFO)."""
    directory = open_directory_no_links(os.path.dirname(path), owners)
    try:
        descriptor = os.open(os.path.basename(path), O_PATH | O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
    finally:
        os.close(directory)
    info = os.fstat(descriptor)
    if not stat_module.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(descriptor)
        raise OSError(errno.EPERM, "not a regular file with one link (a link, FIFO, device or hard link)")
    return descriptor


def read_reached(descriptor: int, limit: int) -> bytes:
    """Open a reached file anew and read it: opening /proc/self/fd/N checks the file's
    permissions against whoever opens it, so a reader that has become the process's user
    reads what that user may read, no more."""
    handle = os.open("/proc/self/fd/%d" % descriptor, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        return os.read(handle, limit)
    finally:
        os.close(handle)


async def read_env_file(config: ProcessConfig) -> Dict[str, str]:
    """A process's env_file, read at each start off the event loop, with the process's own
    rights (read_as), never through a link, bounded. The
    daemon's secrets are not in reach: its key is gone from its environment (scrub_environment)."""
    if not config.env_file:
        return {}
    path = os.path.normpath(os.path.join(config.cwd or os.getcwd(), config.env_file))
    identity = resolve_identity(config) if config.user or config.group else None
    owners = frozenset({os.getuid()} | ({identity.uid} if identity else set()))
    loop = asyncio.get_event_loop()
    try:
        descriptor = await loop.run_in_executor(None, reach_env_file, path, owners)
        try:
            data = await loop.run_in_executor(None, read_as, identity, descriptor, MAX_ENV_FILE_BYTES + 1)
        finally:
            os.close(descriptor)
        if len(data) > MAX_ENV_FILE_BYTES:
            raise ValueError("larger than %d bytes" % MAX_ENV_FILE_BYTES)
        return parse_env_file(data.decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise SpawnError("env_file %r cannot be used: %s" % (path, getattr(exc, "strerror", None) or exc)) from None


def read_as(identity: Optional[Identity], descriptor: int, limit: int) -> bytes:
    """read_reached with the rights of `identity` (None: ours), in a forked child that becomes
    it: the child makes only system calls, then _exit; no interpreter needs to be executable
    by that user. Blocking: for a thread."""
    if identity is None:
        return read_reached(descriptor, limit)
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():         # 3.12+ frowns on fork() with threads: see the docstring
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_end)
            become(identity)
            data = read_reached(descriptor, limit)
            status = 0
        except OSError as exc:
            data = (exc.strerror or "cannot read").encode("utf-8", "replace")
        finally:
            with contextlib.suppress(BaseException):
                os.write(write_end, b"%d" % status + data)
            os._exit(0)
    os.close(write_end)
    try:
        chunks, size = [], 0
        while size <= limit + 1:
            chunk = os.read(read_end, READ_CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    answer = b"".join(chunks)
    if answer[:1] != b"0":
        raise OSError(errno.EACCES, answer[1:201].decode("utf-8", "replace") or "the reader failed")
    return answer[1:limit + 1]


@record
class SupervisorSettings:
    """Timings of supervision and persistence; tests shorten them, the daemon uses defaults."""
    stop_poll_interval: float = STOP_POLL_INTERVAL
    kill_grace: float = KILL_GRACE
    partial_line_flush: float = PARTIAL_LINE_FLUSH
    health_starting_interval: float = HEALTH_STARTING_INTERVAL
    exit_output_grace: float = EXIT_OUTPUT_GRACE
    state_save_interval: float = STATE_SAVE_INTERVAL
    state_lazy_interval: float = STATE_LAZY_INTERVAL
    log_error_report_interval: float = LOG_ERROR_REPORT_INTERVAL


async def terminate_run(run: Run, config: ProcessConfig, sampler: Sampler, settings: SupervisorSettings,
                        leader_alive: bool = True,
                        other_groups: Callable[[], frozenset] = frozenset) -> bool:
    """Stop a run's process group and whatever it started outside it: kill_signal now,
    SIGKILL after kill_timeout. The one place a run is stopped, whoever asks."""
    pgid = run.pid if leader_alive else None
    wait = run.exited if run.proc is not None else None
    return await terminate_group(pgid, escapees(sampler, run.pid, run.token, run.start_ticks, other_groups),
                                 signal.Signals[config.kill_signal], config.kill_timeout / 1000,
                                 wait, sampler, settings.kill_grace, settings.stop_poll_interval,
                                 run.leader_unreaped, run.start_ticks)


def escapees(sampler: Sampler, pgid: Optional[int], run_token: Optional[str], since_ticks: Optional[int] = None,
             other_groups: Callable[[], frozenset] = frozenset) -> List[Tuple[int, int]]:
    """(pid, start) of processes a run started outside its group: by parent links, or by the
    PMDAEMON_RUN_ID they inherited (a double-forked daemon has neither parent nor group).
    Only processes started since the run began can be either, and none in the group of
    another managed run (other_groups(), asked only when there is such a process; a group
    never takes in a process of another session): one pass over the listing, and only the
    environment of the rest is read, so a stop costs about the same with 10 or 1,000 managed
    processes. (The tree alone, by the kernel's lists of children, cannot tell that nothing
    left it: a child reaped by SA_NOCLDWAIT, or one made with CLONE_PARENT, leaves no trace.)
    Out of descriptors, none is found: the group is stopped all the same."""
    try:
        table = sampler.scan(reuse_within=SCAN_REUSE_WINDOW)
    except OSError as exc:
        log.warning("cannot look for what a run left outside its group: %s", exc.strerror or exc)
        return []
    recent = table if since_ticks is None else {
        pid: stat for pid, stat in table.items() if stat.start_ticks >= since_ticks}
    found = set(descendants(recent, pgid)) if pgid else set()
    if run_token:
        others = [pid for pid in recent if pid not in found and pid != os.getpid()]
        groups = other_groups() if others else frozenset()
        marker = ("%s=%s" % (RUN_ID_ENV, run_token)).encode()
        found.update(pid for pid in others if recent[pid].pgid not in groups and sampler.environ_has(pid, marker))
    found = sorted(found)
    sampler.fresh(table, found)                 # their group and state as they are now
    return [(pid, table[pid].start_ticks) for pid in found
            if pid in table and table[pid].pgid != pgid and table[pid].state != "Z"]


# -- the per-process state machine --------------------------------------------------------------

S = ProcessState
# Every transition a process may make; change_state refuses (and logs loudly) any other.
TRANSITIONS: Dict[ProcessState, frozenset] = {
    S.STOPPED: frozenset({S.STARTING}),                       # start
    S.STARTING: frozenset({S.ONLINE,                          # spawned, or ready (wait_ready)
                           S.STOPPING,                        # stop while not yet ready
                           S.STOPPED,                         # stop while waiting for depends_on
                           S.RESTARTING, S.ERRORED}),         # exited before ready; cannot exec
    S.ONLINE: frozenset({S.STOPPING,                          # stop, restart, delete
                         S.RESTARTING, S.ERRORED, S.STOPPED}),  # exited: decide_after_exit
    S.STOPPING: frozenset({S.STOPPED}),                       # the whole group is gone
    S.RESTARTING: frozenset({S.STARTING,                      # the restart delay passed
                             S.STOPPED}),                     # stop cancels the pending restart
    S.ERRORED: frozenset({S.STARTING, S.STOPPED}),            # start again; stop
}
del S


# -- what a runner uses from outside itself: RunnerContext --------------------------------------

class LoopTimers:
    """Timers on the event loop: call_later(delay, callback) returns a handle with cancel().
    A runner's timers (restart delay, listen_timeout, cron) go through this, so a test can
    hand it timers that its own clock drives."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        return asyncio.get_event_loop().call_later(delay, callback)


class BackgroundTasks:
    """Tasks that run on their own: held here (the loop keeps only weak references to tasks),
    and a failure is logged, not lost."""

    def __init__(self):
        self.tasks: set = set()

    def start(self, coroutine) -> asyncio.Task:
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())


def no_cgroup(process_id: int, memory_limit: Optional[int], cpu_limit: Optional[int]) -> List[str]:
    """The cgroup of a runner given none: memory_limit and cpu_limit cannot be applied."""
    raise CannotStart("memory_limit and cpu_limit need a cgroup, and none was given")


@record
class RunnerContext:
    """Everything a ProcessRunner uses from outside itself, each named once. The Supervisor
    makes one for all its runners; a test makes its own (its clock and timers, its spawner)
    and runs a runner with no Supervisor. Calls go out through it; nothing comes back but the
    timers and tasks the runner set itself."""
    log_dir: str                                # where its logs go unless out_file/error_file say
    announce: Callable[[str, Any], None]        # every visible change: (kind, payload), see Supervisor
    clock: Callable[[], float] = time.monotonic     # durations: uptime, checks, log error pacing
    wall: Callable[[], float] = time.time       # what is shown: start and exit times, next restart, cron
    timers: Any = record_field(LoopTimers)      # call_later(delay, callback): restart, ready, cron
    spawner: Callable = spawn_child             # (argv, cwd, env, config[, cgroup_procs]) -> a child
    sampler: Sampler = record_field(Sampler)    # a child's start time; what a run left behind
    settings: SupervisorSettings = record_field(SupervisorSettings)     # stop, flush, check timings
    hub: LogHub = record_field(LogHub)          # live log lines to whoever follows them
    background: Callable = record_field(lambda: BackgroundTasks().start)  # start a task, held
    session: str = record_field(lambda: os.urandom(6).hex())     # run tokens: SESSION-ID
    base_env: Dict[str, str] = record_field(lambda: child_base_environment(os.environ))  # minus secrets
    # (id, memory_limit, cpu_limit) -> the cgroup.procs files a child joins; the Cgroups are shared.
    prepare_cgroup: Callable[[int, Optional[int], Optional[int]], List[str]] = no_cgroup
    # Start order (depends_on): which of these names are not ready yet, and a wait for the next
    # announcement. Without a registry nothing is waited for, so wait_for_change is never called.
    unready_dependencies: Callable[[List[str]], List[str]] = lambda names: []
    wait_for_change: Optional[Callable] = None
    # The groups of the other runs (their leaders' pids): no escapee of this run is in them.
    managed_groups: Callable[[Optional[int]], frozenset] = lambda but=None: frozenset()


def _saved_int(value: Any, high: int) -> int:
    """An integer from the state file, within bounds (a hand-edited file is checked, not trusted)."""
    if not _is_int(value) or not 0 <= value <= high:
        raise ValueError("expected an integer from 0 to %d, got %r" % (high, value))
    return value


class ProcessRunner:
    """One managed process (one instance of a group): its config, its current run, its timers.

    Only this object changes its state, through change_state(). Its public coroutines (start,
    stop, restart, remove) are serialised by one lock. What it needs from outside (clock,
    timers, spawner, sampler, environment, dependencies) and where it reports (announce) is
    its RunnerContext: calls go out through it, and only timers and tasks it started call back."""

    def __init__(self, context: RunnerContext, process_id: int, name: str, config: ProcessConfig,
                 instance: int, port: Optional[int], state: ProcessState = ProcessState.STOPPED):
        self.context = context
        self.id, self.name, self.config, self.instance, self.port = process_id, name, config, instance, port
        self.state = state                      # STOPPED, or ERRORED when restored so
        self.run: Optional[Run] = None
        self.manual_restarts = 0                # asked for: saved soon (see StateStore)
        self.auto_restarts = 0                  # after exits: saved lazily (flash wear)
        self.unstable_restarts = 0
        self.backoff_count = 0
        self.cpu = 0.0
        self.memory = 0
        self.last_exit: Optional[dict] = None
        self.error: Optional[str] = None
        self.next_restart_wall: Optional[float] = None
        self.waiting_for: List[str] = []
        self.health = HealthState()
        self.ever_started = False
        self.watch_status: Optional[dict] = None  # files watched and scans made (watch)
        self.wanted = False                     # should it run (after a daemon restart, too)?
        self.deleted = False
        self.logs = self._make_logs(name, config)
        self.lock = asyncio.Lock()
        self._pending: Dict[str, Any] = {}      # timers and tasks by name: restart, dependencies,
                                                # ready, health, cron, files
        self._log_error_reported = -math.inf

    def _make_logs(self, name: str, config: ProcessConfig, adopt_from: Optional[int] = None) -> ProcessLogs:
        identity = resolve_identity(config) if config.user or config.group else None
        layout = LogLayout(config.out_file, config.error_file, config.merge_logs, config.log_date_format != "none",
                           (identity.uid, identity.gid) if identity else None, adopt_from)
        return ProcessLogs(self.context.log_dir, name, config.log_max_size, config.log_max_files,
                           self.context.hub, self._log_write_failed, self.context.wall, layout)

    def restore(self, entry: dict) -> Optional[Run]:
        """Take back what state.json says of this process's past (restart counts, the error it
        stopped with); returns the run a previous daemon left behind, to be stopped, or None."""
        self.manual_restarts = _saved_int(entry.get("manual_restarts", 0), 1 << 40)
        self.auto_restarts = max(0, _saved_int(entry.get("restarts", 0), 1 << 40) - self.manual_restarts)
        if self.state is ProcessState.ERRORED:
            self.error = str(entry.get("error"))[:1000]
        if entry.get("pid") or entry.get("run_token"):
            return Run(entry.get("run_token"), entry.get("pid"), entry.get("pid_start_ticks"))
        return None

    # -- what it is --------------------------------------------------------------------------

    @property
    def pid(self) -> Optional[int]:
        return self.run.pid if self.run is not None else None

    @property
    def restarts(self) -> int:
        return self.manual_restarts + self.auto_restarts

    @property
    def run_token(self) -> str:
        """PMDAEMON_RUN_ID: the same for every run of a process under this daemon, so that
        finding what a run left behind needs no state write per restart."""
        return "%s-%d" % (self.context.session, self.id)

    @property
    def checked(self) -> bool:
        return bool(self.config.health_check and self.config.health_check["enabled"])

    def is_ready(self) -> bool:
        """Online, and healthy when a health check is configured."""
        return self.state is ProcessState.ONLINE and (not self.checked or self.health.status == "healthy")

    def uptime_ms(self, now: float) -> int:
        return int((now - self.run.started_at) * 1000) if self.run is not None and self.run.pid else 0

    def desired_status(self) -> str:
        """The status this process should have after a daemon restart."""
        if self.state is ProcessState.ERRORED:
            return ProcessState.ERRORED.value
        return (ProcessState.ONLINE if self.wanted else ProcessState.STOPPED).value

    # -- the one way state changes -----------------------------------------------------------

    def change_state(self, new: ProcessState) -> bool:
        """Move to `new` if TRANSITIONS allows it; anything else is a bug, logged, not applied."""
        old = self.state
        if new is old:
            return True
        if new not in TRANSITIONS[old]:
            log.error("bug: %s cannot go from %s to %s; the transition was refused",
                      self.name, old.value, new.value, stack_info=True)
            return False
        self.state = new
        self.context.announce("process_update", self)
        return True

    def event(self, name: str, **extra: Any) -> None:
        """Something happened to the process: the daemon's log, and a process_event."""
        data = {"event": name, "process": self.name, "id": self.id}
        data.update(extra)
        data["timestamp"] = iso_time(self.context.wall())
        log.info("%s %s%s", log_safe(self.name), name,
                 "".join(" %s=%s" % (key, log_safe(str(value))) for key, value in extra.items()))
        self.context.announce("process_event", data)

    def note(self, message: str) -> None:
        """A line from pmdaemon itself in the process's stderr log, so users see why."""
        self.logs.write("stderr", ["[pmdaemon] " + message])

    # -- commands (each under the lock) ------------------------------------------------------

    async def start(self) -> bool:
        """Start a stopped, errored or restart-pending process; False if it already runs."""
        async with self.lock:
            if self.state in RUNNING_STATES or self.deleted:
                return False
            self.wanted = True
            self._cancel("restart", "dependencies")
            self.unstable_restarts = self.backoff_count = 0
            self.next_restart_wall = None
            self.waiting_for = self.context.unready_dependencies(self.config.depends_on)
            if self.waiting_for:
                # -> STARTING with no pid until what it depends on is ready.
                self.error = None
                self.change_state(ProcessState.STARTING)
                self._pending["dependencies"] = self.context.background(self._start_after_dependencies())
            else:
                await self._spawn("started")
            return True

    async def stop(self) -> bool:
        """Stop the process and everything in its group; False if it was not running."""
        async with self.lock:
            was_running = self.run is not None or self.state in (ProcessState.STARTING, ProcessState.RESTARTING)
            self.wanted = False
            await self._stop_locked(quiet=False)
            return was_running

    async def restart(self) -> None:
        """Stop (if running) and start again; counts as a restart."""
        async with self.lock:
            if self.deleted:
                return
            self.wanted = True
            await self._stop_locked(quiet=True)
            self.manual_restarts += 1
            self.unstable_restarts = self.backoff_count = 0
            await self._spawn("restarted")

    async def remove(self) -> None:
        """Stop for good: the process is being deleted; its log files go with it."""
        async with self.lock:
            self.wanted = False
            await self._stop_locked(quiet=True)
            self.deleted = True
            self.logs.close()
            self.logs.remove()

    async def shut_down(self) -> None:
        """Daemon exit: stop, keep the logs, and keep `wanted` and ERRORED for the next daemon."""
        async with self.lock:
            if self.state is not ProcessState.ERRORED:
                await self._stop_locked(quiet=True)
            self._cancel("files")
            self.logs.close()

    def send_signal(self, signum: int) -> bool:
        """Signal the main process of the current run (supervisorctl signal, pm2 sendSignal)."""
        return self.run is not None and self.run.signal(signum)

    async def write_stdin(self, data: bytes) -> None:
        """Write to the child's stdin (created with "stdin": true); the child must read it soon."""
        if not self.config.stdin:
            raise StdinUnavailable("Process %r was not created with \"stdin\": true" % self.name)
        if self.run is None or self.run.proc.stdin is None:
            raise NotRunning("Process %r is not running" % self.name)
        stream = self.run.proc.stdin
        if stream.transport.get_write_buffer_size():
            # One pending write per process: what the child has not taken stays queued (even
            # after its request timed out), so another write would pile up in our memory.
            raise StdinBusy("Process %r has not read the previous stdin write yet" % self.name)
        try:
            stream.write(data)
            await asyncio.wait_for(stream.drain(), STDIN_WRITE_TIMEOUT)
        except asyncio.TimeoutError:
            raise StdinUnavailable("Process %r did not read its stdin within %g s"
                                   % (self.name, STDIN_WRITE_TIMEOUT)) from None
        except (ConnectionError, OSError):
            raise StdinUnavailable("Process %r has closed its stdin" % self.name) from None

    def rename(self, name: str, port: Optional[int], config: ProcessConfig) -> None:
        """A group was reshaped: new name (base <-> base-0), port or config; logs move along."""
        if name != self.name:
            self.logs.rename(name)
            self.name = name
        if LogLayout(config.out_file, config.error_file, config.merge_logs, config.log_date_format) != \
                LogLayout(self.config.out_file, self.config.error_file, self.config.merge_logs,
                          self.config.log_date_format) or (config.user, config.group) != (self.config.user, self.config.group):
            previous = self.logs.layout.owner
            self.logs.close()
            self.logs = self._make_logs(name, config, previous[0] if previous else None)
        for log_file in self.logs.files.values():
            log_file.max_size, log_file.max_files = config.log_max_size, config.log_max_files
        self.port, self.config = port, config
        self.context.announce("process_update", self)

    # -- starting ----------------------------------------------------------------------------

    async def _start_after_dependencies(self) -> None:
        def dependencies_ready() -> bool:
            self.waiting_for = self.context.unready_dependencies(self.config.depends_on)
            return not self.waiting_for
        await self.context.wait_for_change(dependencies_ready, None)
        async with self.lock:
            if self._pending.get("dependencies") is not current_task() or self.deleted:
                return
            del self._pending["dependencies"]
            await self._spawn("started")

    def _child_environment(self, overlay: Dict[str, str]) -> Dict[str, str]:
        """The daemon's environment (minus its secrets) < the run's own (_environment_overlay)."""
        env = dict(self.context.base_env)
        env.update(overlay)
        return env

    def _environment_overlay(self, token: Optional[str], from_file: Dict[str, str]) -> Dict[str, str]:
        """What a run's environment adds to the daemon's: env_file (read at each start:
        read_env_file) < the config's env < what pmdaemon sets. Kept with the run instead of
        the whole environment (which is the same for every process) for its health checks."""
        env = dict(from_file)
        identity = resolve_identity(self.config) if self.config.user else None
        if identity is not None:
            env.update(HOME=identity.home, USER=identity.name, LOGNAME=identity.name)
        env.update(self.config.env)
        if self.port is not None:
            env["PORT"] = str(self.port)
        env["PM2_INSTANCE_ID"] = env["NODE_APP_INSTANCE"] = str(self.instance)
        env["PMDAEMON_PROCESS_NAME"] = self.name
        env[RUN_ID_ENV] = token or ""
        return env

    def _cgroup_procs(self) -> List[str]:
        """The cgroup.procs files the child joins: none without memory_limit and cpu_limit."""
        if self.config.memory_limit is None and self.config.cpu_limit is None:
            return []
        return self.context.prepare_cgroup(self.id, self.config.memory_limit, self.config.cpu_limit)

    async def _spawn(self, event: str) -> None:
        """-> STARTING -> ONLINE (or stays STARTING until ready), or -> ERRORED with the reason."""
        self.change_state(ProcessState.STARTING)
        self.error, self.waiting_for, self.next_restart_wall = None, [], None
        self.ever_started = True
        run = Run(self.run_token)
        try:
            from_file = await read_env_file(self.config)
            run.env = self._environment_overlay(run.token, from_file)
            env = self._child_environment(run.env)
            if self.logs.placed:                # out_file/error_file: reached off the event loop
                await asyncio.get_event_loop().run_in_executor(None, self.logs.prepare)
            argv = build_argv(self.config, env)
            cgroups = self._cgroup_procs()
            run.proc = await self.context.spawner(argv, self.config.cwd, env, self.config, *([cgroups] if cgroups else []))
        except (OSError, PMDaemonError, ValueError, subprocess.SubprocessError) as exc:
            reason = spawn_failure(self.config, exc)
            self.error = reason
            self.note("failed to start: " + reason)
            self.event("errored", reason=reason)
            self.change_state(ProcessState.ERRORED)
            return
        run.pid = run.proc.pid
        run.pidfd = pidfd_of_child(run.pid)     # None if it has exited (and been reaped) already
        run.started_at, run.started_wall = self.context.clock(), self.context.wall()
        stat = self.context.sampler.stat(run.pid)
        run.start_ticks = stat.start_ticks if stat else None
        self._follow_run(run, stat.rss_bytes if stat else 0)
        self.event(event, pid=run.pid)
        if self.config.wait_ready:
            # STARTING -> ONLINE at the first healthy check, or when listen_timeout passes.
            self._pending["ready"] = self.context.timers.call_later(
                self.config.listen_timeout / 1000, functools.partial(self._listen_timeout_passed, run))
            self.context.announce("process_update", self)      # the pid is news even before it is ready
        else:
            self.change_state(ProcessState.ONLINE)

    def _follow_run(self, run: Run, memory: int) -> None:
        """The run is the current one: watch its exit and output, its health, cron and files."""
        self.run = run
        self.cpu, self.memory = 0.0, memory
        self.health.reset(self.checked)
        self._follow_output(run)
        run.proc.exited.add_done_callback(functools.partial(self._exit_seen, run))
        self._schedule_cron()
        if self.config.watch and "files" not in self._pending:
            self._pending["files"] = self.context.background(self._follow_files())
        if self.checked:
            self._pending["health"] = self.context.background(self._health_loop(run))

    # -- an upgrade: handing the run over, and adopting it -----------------------------------

    async def quiesce(self) -> None:
        """Upgrade, before the exec: stop following the current run without touching it. Its
        pipes stop being read; what was read is logged up to the last whole line, and the
        partial line is kept (stream.carried) for the next image."""
        self._cancel("restart", "dependencies", "health", "ready", "cron", "files")
        run = self.run
        if run is None or run.proc is None:
            return
        run.handed_over = True
        if run.watch is not None:
            run.watch.cancel()
        for pump in (run.proc.stdout, run.proc.stderr):
            if pump is not None and not pump.at_eof():
                pump.stop_reading()             # nothing more is read: what was read is all there is
                pump.handed_over = True
                pump.feed_eof()                 # the pump logs its whole lines, then ends
        if run.pumps:
            await asyncio.wait(run.pumps, timeout=self.context.settings.exit_output_grace)

    def handed_over(self) -> Optional[dict]:
        """Upgrade, just before the exec: the run's descriptors, made inheritable, and what the
        next image needs to adopt it (adopt()); None when there is no run to hand over."""
        run = self.run
        if run is None or run.proc is None:
            return None
        descriptors = run.proc.descriptors()
        for descriptor in descriptors:
            if descriptor is not None:
                os.set_inheritable(descriptor, True)
        if run.pidfd is not None:
            os.set_inheritable(run.pidfd, True)
        carried = [base64.b64encode(getattr(stream, "carried", b"") or b"").decode("ascii") if stream else ""
                   for stream in (run.proc.stdin, run.proc.stdout, run.proc.stderr)]
        return {"pid": run.pid, "start_ticks": run.start_ticks, "token": run.token, "pidfd": run.pidfd,
                "started_at": run.started_at, "started_wall": run.started_wall,
                "env": self._child_environment(run.env),    # whole: an older image takes it as it is
                "descriptors": descriptors, "carried": carried, "returncode": run.proc.returncode,
                "stopping": run.stop_requested}

    async def adopt(self, handed: dict) -> None:
        """Upgrade, in the next image: take over the run the previous one handed over, as it
        runs (same pid, same pipes). STOPPED -> STARTING -> ONLINE, like a start without spawn."""
        run = Run(handed["token"], handed["pid"], handed["start_ticks"])
        base = self.context.base_env            # what the run's environment adds to it is kept
        run.pidfd, run.env = handed["pidfd"], {key: value for key, value in handed["env"].items()
                                               if base.get(key) != value}
        run.started_at, run.started_wall = handed["started_at"], handed["started_wall"]
        try:
            run.proc = await adopt_child(run.pid, run.pidfd, handed["descriptors"],
                                         [base64.b64decode(text) for text in handed["carried"]],
                                         handed["returncode"])
        except BaseException:
            if handed["returncode"] is None:
                abandon_child(run.pid)          # not supervised: it must not run on unseen
            run.close()
            raise
        self.wanted, self.ever_started, self.error = True, True, None
        self.change_state(ProcessState.STARTING)
        stat = self.context.sampler.stat(run.pid)
        self._follow_run(run, stat.rss_bytes if stat else 0)
        self.event("adopted", pid=run.pid)
        self.change_state(ProcessState.ONLINE)
        if handed["stopping"]:                  # a stop was under way: it goes on
            self.context.background(self.stop())

    async def _follow_files(self) -> None:
        """watch: restart once the watched files have been quiet for watch_delay after a change."""
        roots = [os.path.join(self.config.cwd or ".", path) for path in self.config.watch]
        loop = asyncio.get_event_loop()
        self.watch_status = {"files": 0, "scans": 0}
        try:
            snapshot = await loop.run_in_executor(None, file_snapshot, roots, self.config.watch_ignore)
        except ValueError as exc:
            return self._stop_watching(str(exc))
        self.watch_status = {"files": len(snapshot), "scans": 0}
        changed_at = None
        while True:
            await asyncio.sleep(min(WATCH_POLL_INTERVAL, self.config.watch_delay / 2000 or WATCH_POLL_INTERVAL))
            try:
                current = await loop.run_in_executor(None, file_snapshot, roots, self.config.watch_ignore)
            except ValueError as exc:
                return self._stop_watching(str(exc))
            self.watch_status = {"files": len(current), "scans": self.watch_status["scans"] + 1}
            if current != snapshot:
                changed = sorted(set(current.items()) ^ set(snapshot.items()))[0][0]
                snapshot, changed_at, first_change = current, loop.time(), changed
            elif changed_at is not None and loop.time() - changed_at >= self.config.watch_delay / 1000:
                changed_at = None
                if self.run is not None:
                    self.note("restarting: %s changed" % os.path.relpath(first_change, self.config.cwd or "."))
                    self.event("watch_restart", file=first_change)
                    await self.restart()

    def _stop_watching(self, reason: str) -> None:
        """Too much to watch: looking at it twice a second would cost a core, so watching ends
        (until the process is stopped and started again) and the user is told why."""
        self.watch_status = dict(self.watch_status, stopped=reason)
        self.note("stopped watching files: %s (add watch_ignore patterns)" % reason)
        log.warning("%s: stopped watching files: %s", log_safe(self.name), reason)
        self.event("watch_stopped", reason=reason)

    def _schedule_cron(self) -> None:
        """cron_restart: a timer to the next minute the schedule names, set at every start."""
        self._cancel("cron")
        if not self.config.cron_restart:
            return
        now = self.context.wall()
        try:
            due = parse_cron(self.config.cron_restart).next_after(datetime.datetime.fromtimestamp(now))
        except ValueError as exc:       # validated, so never; but a running child is not left stuck
            self.note("cron_restart %r is not scheduled: %s" % (self.config.cron_restart, exc))
            return
        self._pending["cron"] = self.context.timers.call_later(
            max(0.0, due.timestamp() - now), lambda: self.context.background(self._cron_due()))

    async def _cron_due(self) -> None:
        self._pending.pop("cron", None)
        if self.run is None or self.deleted:
            return
        self.note("restarting: cron_restart %r" % self.config.cron_restart)
        self.event("cron_restart", schedule=self.config.cron_restart)
        await self.restart()

    def _become_online(self, event: str) -> None:
        self._cancel("ready")
        self.event(event)
        self.change_state(ProcessState.ONLINE)

    def _listen_timeout_passed(self, run: Run) -> None:
        if run is self.run and self.state is ProcessState.STARTING:
            self.note("no healthy check within listen_timeout (%d ms); considered online"
                      % self.config.listen_timeout)
            self._become_online("ready")

    # -- exits -------------------------------------------------------------------------------

    def _follow_output(self, run: Run) -> None:
        proc = run.proc
        flush = self.context.settings.partial_line_flush
        for pump, name in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
            if pump is not None:
                pump.attach(functools.partial(self.logs.write, name), flush)
        run.pumps = [pump.ended for pump in (proc.stdout, proc.stderr) if pump is not None]

    def _exit_seen(self, run: Run, _exited: Any = None) -> Optional[asyncio.Task]:
        """The run's main process has exited: its exit is handled once, in a task started now
        (not one waiting per process from the start: at a thousand processes, 1.5 KB each).
        The task, or None for a run handed over to the next image."""
        if run.watch is None and not run.handed_over:
            run.watch = self.context.background(self._after_exit(run))
        return run.watch

    async def _after_exit(self, run: Run) -> None:
        returncode, pumps = run.proc.returncode, run.pumps
        if not run.stop_requested:
            # The main process is gone on its own: what it left behind would hold its port and
            # outlive the restart, so it is stopped too.
            await terminate_run(run, self.config, self.context.sampler, self.context.settings,
                                other_groups=functools.partial(self.context.managed_groups, run.pid))
        # Let the last output land before the exit is logged; a grandchild may keep the pipe open.
        if pumps:
            await asyncio.wait(pumps, timeout=self.context.settings.exit_output_grace)
        self._on_exit(run, returncode)
        run.close()

    def _on_exit(self, run: Run, returncode: int) -> None:
        """What happens when a run's main process has exited: the one place that decides."""
        if run is not self.run:
            return                              # a stale exit: that run was already replaced
        self._end_run(run, returncode)
        if run.stop_requested:
            return                              # _stop_locked finishes STOPPING -> STOPPED
        code, signame = self.last_exit["code"], self.last_exit["signal"]
        uptime_ms = self.last_exit["uptime"]
        how = "with code %d" % code if code is not None else "by signal %s" % signame
        self.note("process exited %s after %d ms" % (how, uptime_ms))
        self.event("exited", exit_code=code, signal=signame)
        if code != 0:
            self.event("crashed", exit_code=code, signal=signame)
        decision = decide_after_exit(self.config, code, uptime_ms, self.unstable_restarts, self.backoff_count)
        self.unstable_restarts, self.backoff_count = decision.unstable_restarts, decision.backoff_count
        if decision.action == "restart":
            # -> RESTARTING; the timer brings it back to STARTING.
            self.next_restart_wall = self.context.wall() + decision.delay_ms / 1000
            self._pending["restart"] = self.context.timers.call_later(
                decision.delay_ms / 1000, lambda: self.context.background(self._restart_due()))
            self.change_state(ProcessState.RESTARTING)
        elif decision.action == "errored":
            # -> ERRORED: stays down, no spinning, until started again.
            self.error = decision.reason
            self.note("not restarting: " + decision.reason)
            self.event("errored", reason=decision.reason)
            self._cancel("files")
            self.change_state(ProcessState.ERRORED)
        else:
            self.note("not restarting: " + decision.reason)
            self.wanted = False
            self._cancel("files")
            self.change_state(ProcessState.STOPPED)

    def _end_run(self, run: Run, returncode: Optional[int]) -> None:
        """The run is over: record how it ended, forget its timers and usage."""
        self._cancel("health", "ready")
        uptime_ms = self.uptime_ms(self.context.clock())
        code = returncode if returncode is not None and returncode >= 0 else None
        signame = signal.Signals(-returncode).name if returncode is not None and returncode < 0 else None
        self.context.sampler.forget((self.id, run.pid))     # its CPU history ends with the run
        self.run = None
        self.cpu, self.memory = 0.0, 0
        self.last_exit = {"code": code, "signal": signame, "uptime": uptime_ms, "at": iso_time(self.context.wall())}

    async def _restart_due(self) -> None:
        async with self.lock:
            if self.state is not ProcessState.RESTARTING or self.deleted:
                return
            self._pending.pop("restart", None)
            self.auto_restarts += 1
            await self._spawn("restarted")

    # -- stopping ----------------------------------------------------------------------------

    async def _stop_locked(self, quiet: bool) -> None:
        """ONLINE/STARTING -> STOPPING -> STOPPED once the whole group is gone;
        RESTARTING, ERRORED or a start waiting for dependencies -> STOPPED."""
        self._cancel("restart", "dependencies", "health", "ready", "cron")
        if not self.wanted or self.deleted:
            self._cancel("files")               # a restart keeps watching; a stop does not
        self.waiting_for, self.next_restart_wall = [], None
        run = self.run
        if run is not None:
            run.stop_requested = True
            self.change_state(ProcessState.STOPPING)
            await terminate_run(run, self.config, self.context.sampler, self.context.settings,
                                other_groups=functools.partial(self.context.managed_groups, run.pid))
            loop = asyncio.get_event_loop()
            deadline = loop.time() + self.context.settings.exit_output_grace + 1    # for both waits
            await asyncio.wait({run.proc.exited}, timeout=deadline - loop.time())
            handling = self._exit_seen(run) if run.proc.exited.done() else None
            if handling is not None:
                await asyncio.wait({handling}, timeout=max(0.0, deadline - loop.time()))
            if self.run is run:                 # the watcher did not finish: end the run here
                self._end_run(run, run.proc.returncode)
        if self.state is not ProcessState.STOPPED:
            self.change_state(ProcessState.STOPPED)
        if run is not None and not quiet:
            self.event("stopped")

    def _cancel(self, *names: str) -> None:
        """Cancel pending timers or tasks by name (never the task that is running this)."""
        for name in names:
            handle = self._pending.pop(name, None)
            if handle is not None and handle is not current_task():
                handle.cancel()

    # -- readiness, health, limits -----------------------------------------------------------

    async def _health_loop(self, run: Run) -> None:
        check = self.config.health_check
        while True:
            starting = self.state is ProcessState.STARTING
            await asyncio.sleep(self.context.settings.health_starting_interval if starting
                                else check["interval"] / 1000)
            if run is not self.run:
                return
            began = self.context.clock()
            error = await run_health_check(check, self.port, self.config, self._child_environment(run.env))
            if run is not self.run:
                return
            self.health.last_duration = round(self.context.clock() - began, 6)
            self.record_health(error)

    def record_health(self, error: Optional[str]) -> None:
        """Apply one check result: events, readiness, and a restart when unhealthy."""
        starting = self.state is ProcessState.STARTING
        # While waiting to be ready, failures are expected and do not make it unhealthy.
        transition = self.health.record(error, self.context.wall(), self.config.health_check["retries"],
                                        may_fail=not starting)
        self.context.announce("health_update", {"process": self.name, "status": self.health.status,
                                                "error": error, "timestamp": iso_time(self.context.wall())})
        if transition:
            self.event(transition, **({"error": error} if error else {}))
        if starting and error is None:
            self._become_online("ready")
        elif (transition == "unhealthy" and self.config.restart_on_unhealthy
              and self.state is ProcessState.ONLINE):
            self.note("restarting: unhealthy after %d failed checks (%s)"
                      % (self.health.consecutive_failures, error))
            self.context.background(self.restart())
        if transition:
            self.context.announce("process_update", self)

    def record_usage(self, cpu: float, memory: int) -> None:
        """A metrics sample of the process tree; restarts it past max_memory_restart."""
        self.cpu, self.memory = cpu, memory
        limit = self.config.max_memory_restart
        if limit and memory > limit and self.state is ProcessState.ONLINE and not self.lock.locked():
            reason = "memory %d bytes is above max_memory_restart %d" % (memory, limit)
            self.note("restarting: " + reason)
            self.event("memory_limit", reason=reason, memory=memory)
            self.context.background(self.restart())

    def _log_write_failed(self, error: OSError) -> None:
        """A log line could not be written: it is dropped, counted, and reported now and then."""
        now = self.context.clock()
        if now - self._log_error_reported < self.context.settings.log_error_report_interval:
            return
        self._log_error_reported = now
        reason = error.strerror or str(error)
        log.warning("%s: cannot write its log (%s); %d line(s) dropped so far, the process keeps "
                    "running", self.name, reason, self.logs.dropped_lines)
        self.event("log_write_error", error=reason, dropped_lines=self.logs.dropped_lines)


# -- the registry: names, ids, groups, ports ----------------------------------------------------

class Registry:
    """Which processes exist: by id, by name, by group (base name). Knows nothing of children."""

    def __init__(self):
        self.by_id: Dict[int, ProcessRunner] = {}
        self.by_name: Dict[str, ProcessRunner] = {}
        self.by_group: Dict[str, Dict[int, ProcessRunner]] = {}     # base name -> its members by id
        self.next_id = 0

    def __len__(self) -> int:
        return len(self.by_id)

    def runners(self) -> List[ProcessRunner]:
        return list(self.by_id.values())

    def names(self) -> List[str]:
        return [runner.name for runner in self.by_id.values()]

    def find(self, key: str) -> List[ProcessRunner]:
        """A process by exact name, then all instances of a group by base name, then by id;
        "ns:NAME" is every process of a namespace (a name never holds a colon)."""
        if key.startswith("ns:"):
            return sorted((runner for runner in self.by_id.values() if runner.config.namespace == key[3:]),
                          key=lambda runner: runner.id)
        members = [self.by_name[key]] if key in self.by_name else []
        if not members:
            members = self.group(key)
        if not members and is_ascii_digits(key) and len(key) <= 9 and int(key) in self.by_id:
            members = [self.by_id[int(key)]]
        return members

    def group(self, base: str) -> List[ProcessRunner]:
        return sorted(self.by_group.get(base, {}).values(), key=lambda runner: runner.instance)

    def ports_in_use(self, excluding_group: Optional[str] = None) -> set:
        return {runner.port for runner in self.by_id.values()
                if runner.port is not None and runner.config.name != excluding_group}

    def name_clash(self, base: str, names: List[str], excluding_group: Optional[str] = None) -> Optional[str]:
        """The first existing process in the way of a group `base` whose members are `names`."""
        for wanted in [base] + list(names):
            runner = self.by_name.get(wanted)
            if runner is not None and runner.config.name != excluding_group:
                return runner.name
            if wanted in self.by_group and wanted != excluding_group:
                return self.group(wanted)[0].name
        return None

    def take_id(self, wanted: Optional[int] = None) -> int:
        process_id = self.next_id if wanted is None else wanted
        self.next_id = max(self.next_id, process_id + 1)
        return process_id

    def add(self, runner: ProcessRunner) -> None:
        self.by_id[runner.id] = runner
        self.by_name[runner.name] = runner
        self.by_group.setdefault(runner.config.name, {})[runner.id] = runner

    def remove(self, runner: ProcessRunner) -> None:
        self.by_id.pop(runner.id, None)
        if self.by_name.get(runner.name) is runner:
            del self.by_name[runner.name]
        members = self.by_group.get(runner.config.name, {})
        members.pop(runner.id, None)
        if not members:
            self.by_group.pop(runner.config.name, None)

    def renamed(self, runner: ProcessRunner, old_name: str) -> None:
        """A member's name changed (base <-> base-0 when a group is scaled): the indexes follow."""
        if self.by_name.get(old_name) is runner:
            del self.by_name[old_name]
        self.by_name[runner.name] = runner


# -- persistence ----------------------------------------------------------------------------------

def atomic_write(path: str, data: bytes) -> None:
    """Write a file so that a crash at any moment leaves the old or the new content. The
    temporary file is created exclusively (never through a planted link), mode 0600."""
    directory = os.path.dirname(path)
    temporary = "%s.tmp-%d" % (path, os.getpid())
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)                # our own leftover from a crash
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with open(descriptor, "wb", closefd=True) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class StateStore:
    """The saved list: state.json (a snapshot) plus state.journal (each change since, see
    StateJournal). What the API acknowledges is committed, synced, before the answer goes out
    (commit). What the daemon changes on its own is written sparingly (flash wear on edge
    boxes): what matters after a restart (desired status, errors) within save_interval of the
    change, runtime details (pid, restart counts) alone at most every lazy_interval, nothing
    while nothing changed. A write costs the size of what changed: each process's entry is
    compared with what was last written of it (digests), and only the processes touched are
    looked at; the snapshot is rewritten when the journal has outgrown it, and on flush()."""

    def __init__(self, path: str, entry: Callable[[Any], Tuple[dict, dict]], runners: Callable[[], Iterable],
                 header: Callable[[], dict], save_interval: float, lazy_interval: float,
                 clock: Callable[[], float] = time.monotonic):
        self.path = path
        self.journal = StateJournal(os.path.splitext(path)[0] + ".journal")
        self.entry, self.runners, self.header = entry, runners, header   # (durable, runtime) of one runner
        self.save_interval = save_interval
        self.lazy_interval = lazy_interval
        self.clock = clock
        self.writes = 0
        self.last_error: Optional[str] = None
        self._written: Dict[int, Tuple[bytes, bytes]] = {}   # per process: digests of what was written
        self._dirty: Dict[int, Any] = {}        # processes that may have changed, by id
        self._deleted: set = set()              # ids deleted: a late announcement must not bring one back
        self._snapshot_size = 0
        self._last_write = -math.inf
        self._timer = None                      # a prompt look after a change
        self._lazy_timer = None                 # the look when runtime details alone are due

    def touch(self, runner: Any) -> None:
        """This process may have changed: look within save_interval (one timer for all)."""
        if runner.id in self._deleted:
            return
        self._dirty[runner.id] = runner
        if self._timer is None:
            with contextlib.suppress(RuntimeError):      # no loop (a synchronous caller): flush() saves
                self._timer = asyncio.get_event_loop().call_later(self.save_interval, self._check)

    def _check(self) -> None:
        self._timer = None
        lazy_due = self.clock() - self._last_write >= self.lazy_interval     # since the last write
        waiting = {}
        for runner_id, runner in self._dirty.items():
            durable, runtime = self.entry(runner)
            digests = self._digests(durable, runtime)
            written = self._written.get(runner_id)
            if written is None or digests[0] != written[0] or (digests[1] != written[1] and lazy_due):
                self._put(runner_id, durable, runtime, digests)
            elif digests[1] != written[1]:
                waiting[runner_id] = runner     # runtime details alone: at the lazy interval
        self._dirty = waiting
        if waiting and self._lazy_timer is None:
            self._lazy_timer = asyncio.get_event_loop().call_later(
                max(0.0, self._last_write + self.lazy_interval - self.clock()), self._lazy_due)
        if self.journal.pending:
            asyncio.ensure_future(self._sync_quietly())

    def _lazy_due(self) -> None:
        self._lazy_timer = None
        self._check()

    @staticmethod
    def _digests(durable: dict, runtime: dict) -> Tuple[bytes, bytes]:
        """What is kept of a write to compare with: not the entry itself (~1 KB a process)."""
        return (hashlib.blake2b(json.dumps(durable, sort_keys=True).encode(), digest_size=16).digest(),
                hashlib.blake2b(json.dumps(runtime, sort_keys=True).encode(), digest_size=16).digest())

    def _put(self, runner_id: int, durable: dict, runtime: dict, digests: Tuple[bytes, bytes]) -> None:
        self.journal.append({"put": dict(durable, **runtime), "next_id": self.header()["next_id"]})
        self._written[runner_id] = digests

    async def commit(self, changed: Iterable = (), deleted: Iterable[int] = ()) -> None:
        """Write these processes' entries (and forget the deleted ones) and return once they are
        on disk: what the API answers with 2xx. StateNotSaved when they cannot be."""
        for runner in changed:
            self._dirty.pop(runner.id, None)
            durable, runtime = self.entry(runner)
            self._put(runner.id, durable, runtime, self._digests(durable, runtime))
        for runner_id in deleted:
            self._deleted.add(runner_id)
            self._dirty.pop(runner_id, None)
            self._written.pop(runner_id, None)
            self.journal.append({"delete": runner_id, "next_id": self.header()["next_id"]})
        wrote = self.journal.pending
        try:
            await self.journal.commit()
        except StateNotSaved as exc:
            self._failed(exc)
            raise
        self._saved(wrote)

    async def _sync_quietly(self) -> None:
        """What the daemon changed on its own: an error is logged, and tried again later."""
        with contextlib.suppress(StateNotSaved):
            await self.commit()

    def _failed(self, exc: PMDaemonError) -> None:
        if exc.message != self.last_error:
            log.error("%s (retrying)", exc.message)
        self.last_error = exc.message
        self._written.clear()                   # unsure what is on disk: write each entry again
        for runner in self.runners():
            self._dirty[runner.id] = runner
        if self._timer is None:
            self._timer = asyncio.get_event_loop().call_later(self.save_interval, self._check)

    def _saved(self, wrote: bool) -> None:
        if self.last_error is not None:
            log.info("state saved to %s again", self.path)
        self.last_error = None
        self.writes += wrote
        if wrote:
            self._last_write = self.clock()
        if self.journal.due_for_compaction(self._snapshot_size) and not self.journal.busy:
            with contextlib.suppress(OSError):
                self._write_snapshot()

    def _write_snapshot(self) -> None:
        """state.json anew, with every process, then an empty journal. Synchronous: nothing is
        appended meanwhile, and a crash between the two replays a journal that changes nothing."""
        entries, written = [], {}
        for runner in self.runners():
            durable, runtime = self.entry(runner)
            entries.append(dict(durable, **runtime))
            written[runner.id] = self._digests(durable, runtime)
        data = json.dumps(dict(self.header(), processes=entries), indent=1).encode()
        atomic_write(self.path, data)
        self.journal.truncate()
        self._written, self._snapshot_size = written, len(data)
        self.writes += 1
        self._last_write = self.clock()

    def flush(self) -> None:
        """Write everything (after a restore, at shutdown): a new snapshot, an empty journal;
        errors are logged."""
        for timer in (self._timer, self._lazy_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._lazy_timer = None
        self._dirty = {}
        try:
            self._write_snapshot()
        except OSError as exc:
            log.error("cannot save state to %s: %s", self.path, exc.strerror or exc)
        self.journal.close()

    def load(self) -> Optional[dict]:
        """The saved state (the snapshot, and the journal replayed on it), or None; a corrupt
        snapshot is moved aside, never silently emptied."""
        snapshot = self._load_snapshot()
        if snapshot is None and not os.path.exists(self.journal.path):
            return None
        return self.journal.replay(snapshot or {"processes": []})

    def _load_snapshot(self) -> Optional[dict]:
        try:
            with open(open_private(self.path, os.O_RDONLY), "rb") as handle:
                data = json.loads(handle.read().decode("utf-8"))
            if not isinstance(data, dict) or not isinstance(data.get("processes"), list):
                raise ValueError("not a pmdaemon state object")
            return data
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            aside = "%s.corrupt-%s" % (self.path, time.strftime("%Y%m%dT%H%M%S"))
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            log.error("state file %s is unreadable (%s); moved it to %s and started empty",
                      self.path, exc, aside)
            return None

    def keep_rejected(self, rejected: List[dict]) -> None:
        kept = "%s.rejected-%s" % (self.path, time.strftime("%Y%m%dT%H%M%S"))
        atomic_write(kept, json.dumps(rejected, indent=1).encode())
        log.error("the %d saved process(es) that could not be restored are kept in %s", len(rejected), kept)


class StateJournal:
    """What changed since the snapshot (state.json), one line a change in state.journal:
    `<crc32 in hex> <json>`, where the JSON is {"put": entry} or {"delete": id}. A change is
    appended and fsynced before it is acknowledged; changes that arrive while a sync is under
    way share the next one (group commit), and the syncs run off the event loop. A line that a
    crash cut short or damaged ends the replay there (and is cut off), so what was
    acknowledged is exactly what comes back. Each change costs its own size, never the whole
    state: the snapshot is rewritten only when the journal has grown past it (compact)."""

    def __init__(self, path: str):
        self.path = path
        self.size = 0                           # bytes in the journal, acknowledged or being synced
        self.syncs = 0
        self._descriptor: Optional[int] = None
        self._pending: List[bytes] = []
        self._waiters: List[Any] = []
        self._flushing = False

    @staticmethod
    def line(record: dict) -> bytes:
        text = json.dumps(record, sort_keys=True, separators=(",", ":")).encode("utf-8")
        return b"%08x %s\n" % (zlib.crc32(text), text)

    def append(self, record: dict) -> None:
        """Queue a record; commit() makes it (and all queued before it) durable."""
        self._pending.append(self.line(record))

    async def commit(self) -> None:
        """Return once every record appended so far is on disk; StateNotSaved if it cannot be."""
        loop = asyncio.get_event_loop()
        waiter = loop.create_future()
        self._waiters.append(waiter)
        if not self._flushing:
            self._flushing = True
            asyncio.ensure_future(self._flush())
        await waiter

    async def _flush(self) -> None:
        loop = asyncio.get_event_loop()
        try:
            while self._waiters:
                data, waiters = b"".join(self._pending), self._waiters
                self._pending, self._waiters = [], []
                try:
                    if data:
                        await loop.run_in_executor(None, self._write, data)
                    error = None
                except OSError as exc:
                    error = StateNotSaved("cannot save state to %s: %s" % (self.path, exc.strerror or exc))
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None) if error is None else waiter.set_exception(error)
        finally:
            self._flushing = False

    def _write(self, data: bytes) -> None:
        """Append and fsync, whole or not at all (a short write is taken back). In a thread."""
        if self._descriptor is None:
            self._descriptor = open_private(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            self.size = os.fstat(self._descriptor).st_size
        start, view = self.size, memoryview(data)
        try:
            while view:
                view = view[os.write(self._descriptor, view):]
            os.fsync(self._descriptor)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._descriptor, start)
            raise
        self.size = start + len(data)
        self.syncs += 1

    def replay(self, state: dict) -> dict:
        """Apply the journal to a snapshot (state.json's form); a damaged tail is cut off."""
        processes = {entry["id"]: entry for entry in state.get("processes", [])}
        try:
            with open(open_private(self.path, os.O_RDONLY), "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            data = b""
        good = 0
        for raw in data.split(b"\n")[:-1] if data else []:
            record = self._parse(raw)
            if record is None:
                break
            if "put" in record:
                processes[record["put"]["id"]] = record["put"]
                state["next_id"] = max(state.get("next_id", 0), record["put"]["id"] + 1)
            else:
                processes.pop(record["delete"], None)
            if _is_int(record.get("next_id")):
                state["next_id"] = max(state.get("next_id", 0), record["next_id"])
            good += len(raw) + 1
        if good < len(data):
            log.warning("%s: %d byte(s) after the last whole change were cut off (a crash while "
                        "writing; nothing acknowledged was in them)", self.path, len(data) - good)
            with contextlib.suppress(OSError):
                descriptor = open_private(self.path, os.O_WRONLY)
                os.ftruncate(descriptor, good)
                os.close(descriptor)
        self.size = good
        state["processes"] = sorted(processes.values(), key=lambda entry: entry["id"])
        return state

    @staticmethod
    def _parse(raw: bytes) -> Optional[dict]:
        checksum, _, text = raw.partition(b" ")
        try:
            if len(checksum) != 8 or int(checksum, 16) != zlib.crc32(text):
                return None
            record = json.loads(text.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None
        if isinstance(record, dict) and isinstance(record.get("put"), dict) and _is_int(record["put"].get("id")):
            return record
        if isinstance(record, dict) and _is_int(record.get("delete")):
            return record
        return None

    @property
    def pending(self) -> bool:
        """Records appended and not yet handed to a sync."""
        return bool(self._pending)

    @property
    def busy(self) -> bool:
        """A sync is under way (in a thread): the journal must not be cut meanwhile."""
        return self._flushing

    def due_for_compaction(self, snapshot_size: int) -> bool:
        return self.size > max(JOURNAL_MIN_COMPACT, snapshot_size)

    def truncate(self) -> None:
        """After a new snapshot: the journal starts again (replaying it would change nothing)."""
        if self._descriptor is None:
            self._descriptor = open_private(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.ftruncate(self._descriptor, 0)
        os.fsync(self._descriptor)
        self.size = 0

    def close(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None


# -- metrics ------------------------------------------------------------------------------------

class MetricsLoop:
    """Every interval: system metrics, and cpu/memory of each running process's tree. Never
    raises: a sample that fails is logged and the next one tried.

    What a tick costs follows what moves, not what exists. /proc is listed every
    LISTING_EVERY-th tick (or when a run began since), and the trees found then are re-read
    in between. A tree that used no CPU for QUIET_AFTER reads is quiet: it cannot have grown
    without running, so it is re-read on every QUIET_EVERY-th tick only, in turn with the
    others (QUIET_EVERY_MAX buckets, a few read each tick); with more than
    QUIET_READS_PER_TICK * QUIET_EVERY quiet trees, fewer buckets a tick, down to one, so a
    thousand sleeping processes cost ~34 reads a tick and no pass over the thousand. (A read
    of /proc/PID/stat costs 30-100 us once caches have gone cold in the second between
    ticks: the reads are the cost.) Who runs with which pid (the roll) is updated for the
    processes that changed since the last tick (changed(): a state, a pid, a deletion; not a
    health check's result, nor the tick itself), and taken whole at the first tick and every
    ROLL_EVERY-th. A quiet process that wakes shows its CPU within QUIET_EVERY ticks
    (QUIET_EVERY_MAX at most), as an average."""

    def __init__(self, sampler: Sampler, registry: Registry, announce: Callable[[str, Any], None],
                 wall: Callable[[], float] = time.time, quiet_reads_per_tick: int = QUIET_READS_PER_TICK):
        self.sampler = sampler
        self.registry = registry
        self.announce = announce
        self.system = SystemMetrics(wall_time=wall())
        self._ticks = 0
        self._changed: set = set()              # runner ids whose state, pid or existence changed
        self._relist = True                     # a run is not in the last listing
        self._table: Dict[int, PidStat] = {}    # the last listing, kept current by fresh()
        self._trees: Dict[int, List[int]] = {}  # runner id -> the pids of its tree (its pid first)
        self._active: Dict[int, Tuple[ProcessRunner, int]] = {}    # runner id -> (runner, pid): every tick
        self._quiet: List[Dict[int, Tuple[ProcessRunner, int]]] = [{} for _ in range(QUIET_EVERY_MAX)]
        self._next_bucket = 0                   # the quiet bucket read next, round the buckets
        self._quiet_reads = quiet_reads_per_tick
        self._idle: Dict[int, Tuple[int, int]] = {}     # runner id -> (cpu ticks when last read, idle reads)

    def sample(self) -> None:
        self.system = self.sampler.system()
        self._ticks += 1
        if self._ticks % ROLL_EVERY == 1:
            self._take_roll()                   # whole, now and then: what no announcement told
        elif self._changed:
            self._update_roll()
        if self._idle:
            try:
                self._sample_trees()
            except OSError as exc:              # out of descriptors: this tick goes without
                self.sampler.note_unreadable("process list", exc)
            else:
                self.sampler.unreadable.discard("process list")
        self.announce("tick", self.system)

    def changed(self, runner_id: int) -> None:
        """A process's state, pid or existence changed: its place in the roll, at the next tick."""
        self._changed.add(runner_id)

    def _update_roll(self) -> None:
        """The roll for the processes that changed only: a new run (or a new pid) is active."""
        changed, self._changed = self._changed, set()
        for key in changed:
            runner = self.registry.by_id.get(key)
            entry = (runner, runner.pid) if runner is not None and runner.pid is not None else None
            bucket = self._quiet[key % QUIET_EVERY_MAX]
            if entry is not None and self._active.get(key, bucket.get(key)) == entry:
                continue
            self._active.pop(key, None)
            bucket.pop(key, None)
            self._idle.pop(key, None)
            if entry is not None:
                self._active[key], self._idle[key] = entry, (-1, 0)
                self._relist = True

    def _take_roll(self) -> None:
        """Who runs with which pid: a new run (or a new pid) is active until it has been quiet."""
        self._changed = set()
        roll = {runner.id: (runner, runner.pid) for runner in self.registry.runners()}
        active = {key: entry for key, entry in self._active.items() if roll.get(key) == entry}
        quiet = [{key: entry for key, entry in bucket.items() if roll.get(key) == entry} for bucket in self._quiet]
        for key, entry in roll.items():
            if entry[1] is not None and key not in active and key not in quiet[key % QUIET_EVERY_MAX]:
                active[key] = entry
                self._idle.pop(key, None)
                self._relist = True
        self._active, self._quiet = active, quiet
        self._idle = {key: self._idle.get(key, (-1, 0)) for key in roll if roll[key][1] is not None}

    def _sample_trees(self) -> None:
        if self._relist or self._ticks % LISTING_EVERY == 1:
            listed_before, self._table = self._table, self.sampler.scan()
            if self._relist or self._table.keys() != listed_before.keys():
                self._walk()                    # (a parent changes only when it exits)
            self._relist = False
        table = self._table
        due = list(self._active.values())
        for bucket in self._quiet_due():
            due.extend(bucket.values())
        if self.sampler.fresh(table, [member for runner, _ in due for member in self._trees[runner.id]]):
            self._walk()                        # a member left, or changed parent
        trees = self._trees
        for runner, pid in due:
            tree = [member for member in trees[runner.id] if member in table]
            ticks = sum(table[member].cpu_ticks for member in tree)
            runner.record_usage(self.sampler.tree_cpu((runner.id, pid), ticks),
                                sum(table[member].rss_bytes for member in tree))
            before, idle = self._idle[runner.id]
            idle = idle + 1 if before == ticks else 0
            self._idle[runner.id] = (ticks, idle)
            bucket = self._quiet[runner.id % QUIET_EVERY_MAX]
            if idle >= QUIET_AFTER:
                bucket[runner.id] = self._active.pop(runner.id, None) or bucket[runner.id]
            elif runner.id in bucket:
                self._active[runner.id] = bucket.pop(runner.id)

    def _quiet_due(self) -> List[Dict[int, Tuple[ProcessRunner, int]]]:
        """The quiet buckets read this tick: enough that each is read every QUIET_EVERY-th
        tick, fewer (down to one a tick) when that would be more than quiet_reads a tick."""
        quiet = sum(len(bucket) for bucket in self._quiet)
        most = QUIET_EVERY_MAX // QUIET_EVERY
        count = max(1, min(most, self._quiet_reads * QUIET_EVERY_MAX // max(quiet, 1)))
        first, self._next_bucket = self._next_bucket, (self._next_bucket + count) % QUIET_EVERY_MAX
        return [self._quiet[(first + offset) % QUIET_EVERY_MAX] for offset in range(count)]

    def _walk(self) -> None:
        """The trees again from the listing. A member new to a tree brings the CPU time it used
        before it was seen into the tree's baseline (not into one sample as a spike), and a
        quiet tree that gained one is active again (a fork costs less than a clock tick)."""
        children, table = children_index(self._table), self._table
        entries = list(self._active.values()) + [entry for bucket in self._quiet for entry in bucket.values()]
        trees, before = {}, self._trees
        for runner, pid in entries:
            tree = trees[runner.id] = descendants(table, pid, children) or [pid]
            known = before.get(runner.id)
            if known is None or known[0] != pid:
                continue
            joined = set(tree).difference(known)
            if joined:
                self.sampler.add_to_baseline((runner.id, pid), sum(table[member].cpu_ticks for member in joined))
                bucket = self._quiet[runner.id % QUIET_EVERY_MAX]
                if runner.id in bucket:
                    self._active[runner.id] = bucket.pop(runner.id)
                    self._idle[runner.id] = (-1, 0)
        self._trees = trees

    async def run(self, interval: float) -> None:
        while True:
            try:
                self.sample()
            except Exception:
                log.exception("sampling failed")
            await asyncio.sleep(interval)


# -- the supervisor: what the API calls ---------------------------------------------------------

Listener = Callable[[str, Any], None]


class Supervisor:
    """The managed processes as a whole: creates, finds, reshapes and deletes them, hosts their
    runners, persists them and announces every change to listeners as (kind, payload)."""

    def __init__(self, home: str, sampler: Optional[Sampler] = None,
                 environ: Optional[Dict[str, str]] = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 spawner: Callable = spawn_child, settings: Optional[SupervisorSettings] = None,
                 hub: Optional[LogHub] = None, timers: Optional[LoopTimers] = None):
        self.home = home
        self.log_dir = os.path.join(home, "logs")
        self.sampler = sampler or Sampler()
        self.clock, self.wall = clock, wall
        self.settings = settings or SupervisorSettings()
        self.hub = hub or LogHub()
        self.registry = Registry()
        self.file_limit: Optional[int] = None   # the daemon's soft RLIMIT_NOFILE, once it has set it
        self.fds_at_start = 0
        self.store = StateStore(os.path.join(home, "state.json"), self.saved_entry, self.registry.runners,
                                self.saved_header, self.settings.state_save_interval,
                                self.settings.state_lazy_interval, clock)
        self.metrics = MetricsLoop(self.sampler, self.registry, self._announce, wall)
        self._cgroups: Optional[Cgroups] = None
        self.generation = 0                     # counts announcements: keys the API's caches
        self.listeners: List[Listener] = []
        self.tasks = BackgroundTasks()
        self._change: Optional[asyncio.Event] = None
        self.context = RunnerContext(       # what every runner gets: see RunnerContext
            log_dir=self.log_dir, announce=self._announce, clock=clock, wall=wall, timers=timers or LoopTimers(),
            spawner=spawner, sampler=self.sampler, settings=self.settings, hub=self.hub,
            background=self.tasks.start, session=os.urandom(6).hex(),
            base_env=child_base_environment(os.environ if environ is None else environ),
            prepare_cgroup=self._prepare_cgroup, unready_dependencies=self.unready_dependencies,
            wait_for_change=self.wait_for_change, managed_groups=self.managed_groups)
        os.makedirs(self.log_dir, mode=0o700, exist_ok=True)

    @property
    def system(self) -> SystemMetrics:
        return self.metrics.system

    # -- announcements: the one path of every visible change ----------------------------------

    def _announce(self, kind: str, payload: Any) -> None:
        self.generation += 1
        if kind == "process_update":            # a runner changed: maybe what is saved of it
            self.store.touch(payload)
            self.metrics.changed(payload.id)
        elif kind == "process_event":           # a start, an exit, a deletion: maybe a new pid
            self.metrics.changed(payload["id"])
        for listener in list(self.listeners):
            try:
                listener(kind, payload)
            except Exception:
                log.exception("listener failed on %s", kind)
        if self._change is not None:
            self._change.set()          # wake wait_for_change(); the next waiter gets a fresh event
            self._change = None

    # -- what the runners' context asks of the whole ------------------------------------------

    @property
    def cgroups(self) -> Cgroups:
        if self._cgroups is None:               # looked for once, when first needed
            self._cgroups = Cgroups(self.home)
        return self._cgroups

    def _prepare_cgroup(self, process_id: int, memory_limit: Optional[int], cpu_limit: Optional[int]) -> List[str]:
        return self.cgroups.prepare(process_id, memory_limit, cpu_limit)

    def unready_dependencies(self, depends_on: List[str]) -> List[str]:
        """Names in depends_on whose processes are not online (and healthy when checked).
        A dependency deleted since is no longer waited for."""
        waiting = []
        for name in depends_on:
            waiting.extend(other.name for other in self.registry.find(name) if not other.is_ready())
        return waiting

    async def wait_for_change(self, predicate: Callable[[], bool], timeout: Optional[float]) -> bool:
        """Wait for announcements until predicate is true; False at the timeout."""
        loop = asyncio.get_event_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not predicate():
            if self._change is None:
                self._change = asyncio.Event()
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._change.wait(), remaining)
            except asyncio.TimeoutError:
                return predicate()
        return True

    # -- lookup ----------------------------------------------------------------------------------

    def resolve(self, key: str) -> List[ProcessRunner]:
        members = self.registry.find(key)
        if not members:
            raise ProcessNotFound(key, self.registry.names())
        return members

    # -- create, start, stop, restart, reshape, reload, delete ------------------------------------

    async def add(self, config: ProcessConfig) -> List[ProcessRunner]:
        """Register a new process (or group of instances), save, then start it."""
        names = [member_name(config.name, index, config.instances) for index in range(config.instances)]
        clash = self.registry.name_clash(config.name, names)
        if clash is not None:
            raise AlreadyExists("Process %r already exists" % config.name,
                                {"name": config.name, "existing_process": clash})
        if len(self.registry) + config.instances > MAX_PROCESSES:
            raise TooManyProcesses("at most %d processes can be managed" % MAX_PROCESSES)
        self._check_room(config.instances)
        self._check_dependencies(config)
        ports = assign_ports(config.port, config.instances,
                             self.registry.ports_in_use() if config.port is not None else set())
        members = [self._register(config, index, ports[index]) for index in range(config.instances)]
        for runner in members:
            runner.wanted = config.autostart    # saved as online: a daemon killed now starts it
        try:
            await self.store.commit(members)    # a process the next daemon would not know is lost
        except StateNotSaved:
            for runner in members:
                self.registry.remove(runner)
            raise
        if config.autostart:
            for runner in members:
                await runner.start()
        return members

    def _register(self, config: ProcessConfig, index: int, port: Optional[int],
                  process_id: Optional[int] = None, state: ProcessState = ProcessState.STOPPED) -> ProcessRunner:
        runner = ProcessRunner(self.context, self.registry.take_id(process_id),
                               member_name(config.name, index, config.instances), config, index, port, state)
        self.registry.add(runner)
        self._announce("process_update", runner)
        return runner

    async def start(self, members: List[ProcessRunner]) -> List[ProcessRunner]:
        """Start each; AlreadyRunning if none was stopped, CannotStart if one cannot exec."""
        started = [runner for runner in members if await runner.start()]     # novermin (3.6 has PEP 530)
        if not started:
            raise AlreadyRunning("Process %r is already running" % group_label(members))
        await self.store.commit(started)        # on disk before the answer: "started" survives a crash
        self._check_started(started)
        return started

    async def stop(self, members: List[ProcessRunner]) -> bool:
        """Stop each; True if any was running. Saved before the answer: a stop never comes back."""
        stopped = any([await runner.stop() for runner in members])     # novermin (3.6 has PEP 530)
        await self.store.commit(members)
        return stopped

    async def restart(self, key: str, port: Optional[str] = None, instances: Optional[int] = None) -> List[ProcessRunner]:
        """POST .../restart: optionally move to new ports and scale a group, then restart all."""
        members = self.resolve(key)
        base = members[0].config.name
        if instances is not None or port is not None:
            if len(members) != len(self.registry.group(base)):
                raise BadRequest("port and instances apply to the whole group %r, not to one "
                                 "instance" % base)
            config = record_replace(members[0].config)
            config.port = port if port is not None else config.port
            config.instances = instances if instances is not None else config.instances
            members = await self._reshape(base, config, keep_ports=port is None)
        for runner in members:
            if runner.ever_started or runner.state is not ProcessState.STOPPED:
                await runner.restart()
            else:
                await runner.start()            # a copy added by scaling up: its first start
        await self.store.commit(members)
        self._check_started(members)
        return members

    async def update(self, key: str, changes: Any) -> Tuple[List[ProcessRunner], str]:
        """PATCH: change any settings of a process or group in place (its id, logs and restart
        count stay). Returns the members and how it was applied: "unchanged"; "saved" (nothing
        runs); "scaled" (only instances changed: copies added or removed, the others left
        running); "restarted" (the running copies were restarted with the new settings)."""
        if not isinstance(changes, dict):
            raise BadRequest("request body must be a JSON object, got %s" % _json_type(changes))
        members = self.resolve(key)
        base, old = members[0].config.name, members[0].config
        if len(members) != len(self.registry.group(base)):
            raise BadRequest("settings belong to the whole group %r; address it by that name" % base)
        if changes.get("name", base) != base:
            raise invalid_field("name", "a process cannot be renamed; delete it and create it anew")
        merged = old.to_dict()
        merged.update(changes)
        config = ProcessConfig.from_dict(merged, base_dir=old.cwd)
        self._check_dependencies(config)
        if config == old:
            return members, "unchanged"
        running = {runner.instance for runner in members if runner.wanted or runner.run is not None}
        members = await self._reshape(base, config, keep_ports=config.port == old.port)
        if not running:
            return members, "saved"
        only_scaled = record_replace(config, instances=old.instances) == old
        for runner in members:
            if runner.instance not in running:
                await runner.start()            # a new copy
            elif not only_scaled:
                await runner.restart()
        await self.store.commit(members)
        self._check_started(members)
        return members, "scaled" if only_scaled else "restarted"

    def _check_dependencies(self, config: ProcessConfig) -> None:
        identity = resolve_identity(config)     # user/group: root only, and they must exist
        self._check_log_paths(config, identity)
        if (config.memory_limit or config.cpu_limit) and not self.cgroups.usable:
            field = "memory_limit" if config.memory_limit else "cpu_limit"
            raise invalid_field(field, "%s needs a cgroup the daemon can write (cgroup v2 delegated to it, "
                                "or v1 as root): %s" % (field, self.cgroups.why))
        for dependency in config.depends_on:
            if not self.registry.find(dependency):
                raise invalid_field("depends_on", "depends_on names an unknown process %r" % dependency)

    def _check_log_paths(self, config: ProcessConfig, identity: Optional[Identity]) -> None:
        """out_file/error_file: never a file another process logs to (or the daemon's home),
        in an existing directory owned by the daemon's user or the process's user."""
        if config.out_file is None and config.error_file is None:
            return
        owners = {os.getuid()} | ({identity.uid} if identity else set())
        taken = {log_file.path for runner in self.registry.runners() if runner.config.name != config.name
                 for log_file in runner.logs.files.values()}
        for field in ("out_file", "error_file"):
            path = getattr(config, field)
            if path is None:
                continue
            if path in taken or path.startswith(self.home + os.sep):
                raise invalid_field(field, "%s %r is another process's log or inside the daemon's home" % (field, path))
            try:
                info = os.stat(os.path.dirname(path))
            except OSError:
                raise invalid_field(field, "the directory of %s %r does not exist" % (field, path)) from None
            if not stat_module.S_ISDIR(info.st_mode) or info.st_uid not in owners:
                raise invalid_field(field, "the directory of %s %r must belong to the daemon's user or the "
                                    "process's user" % (field, path))

    def _check_started(self, members: List[ProcessRunner]) -> None:
        failed = [runner for runner in members if runner.state is ProcessState.ERRORED]
        if failed:
            raise CannotStart("Process %r could not start: %s" % (failed[0].name, failed[0].error),
                              {"process": failed[0].name, "status": "errored", "reason": failed[0].error})

    async def _reshape(self, base: str, config: ProcessConfig, keep_ports: bool) -> List[ProcessRunner]:
        """Give a group a new config, scaling it and/or changing its port: copies are identified
        by their index, so the group keeps indexes 0..N-1 (names unique, whatever was deleted
        before), kept copies keep their ports unless the port changes, the highest go first."""
        members = self.registry.group(base)
        count = config.instances
        names = [member_name(base, index, count) for index in range(count)]
        clash = self.registry.name_clash(base, names, excluding_group=base)
        if clash is not None:
            raise AlreadyExists("cannot scale %r to %d instances: the name %r is taken"
                                % (base, count, clash), {"existing_process": clash})
        keep = {runner.instance: runner.port for runner in members if runner.port is not None} if keep_ports else {}
        ports = assign_ports(config.port, count, self.registry.ports_in_use(excluding_group=base), keep)
        removed = []
        for runner in sorted(members, key=lambda r: -r.instance):
            if runner.instance >= count:        # scale down: highest first
                removed.append(await self._delete_runner(runner))
        present = {runner.instance: runner for runner in members if runner.instance < count}
        for index in range(count):
            if index in present:
                old_name = present[index].name
                present[index].rename(names[index], ports[index], config)
                self.registry.renamed(present[index], old_name)
            else:                               # scale up, or fill a gap left by a delete
                self._register(config, index, ports[index])
        await self.store.commit(self.registry.group(base), removed)
        return self.registry.group(base)

    async def reload(self, key: str) -> List[ProcessRunner]:
        """Zero-downtime restart of a group: one copy at a time, each ready before the next.

        Every copy has its own port, so a copy is replaced in place (stop, start, wait until
        online and healthy when checked): at every moment at least N-1 copies serve."""
        members = self.resolve(key)
        try:
            await self._reload(members)
        finally:
            await self.store.commit(members)
        return members

    async def _reload(self, members: List[ProcessRunner]) -> None:
        for runner in members:
            await runner.restart()
            self._check_started([runner])
            if len(members) == 1:
                break
            check = runner.config.health_check
            patience = (runner.config.listen_timeout + (check["interval"] * (check["retries"] + 1)
                                                        if runner.checked else 0)) / 1000
            if not await self.wait_for_change(runner.is_ready, patience):
                raise ReloadStopped("reload stopped: %r did not become ready within %d ms; the copies "
                                    "not yet reloaded were left running" % (runner.name, patience * 1000),
                                    {"process": runner.name, "status": runner.state.value})

    async def delete(self, key: str) -> List[ProcessRunner]:
        members = self.resolve(key)
        removed = [await self._delete_runner(runner) for runner in members]     # novermin (3.6 has PEP 530)
        await self.store.commit(deleted=removed)
        return members

    async def _delete_runner(self, runner: ProcessRunner) -> int:
        """Stop and forget one process; its id, for the store."""
        await runner.remove()
        if runner.config.memory_limit or runner.config.cpu_limit:
            self.cgroups.remove(runner.id)
        self.registry.remove(runner)
        self.hub.end(runner.name)
        runner.event("deleted")
        return runner.id

    # -- persistence -----------------------------------------------------------------------------

    def _check_room(self, instances: int) -> None:
        """OutOfDescriptors unless the file limit has room for `instances` more processes. The
        estimate (FDS_PER_PROCESS each) is cheap; near the limit, what is held is counted."""
        if self.file_limit is None or len(self.registry) + instances <= self.process_room():
            return
        try:
            in_use = len(os.listdir("/proc/self/fd"))
        except OSError:                         # not even one descriptor to list them with
            in_use = self.file_limit
        if in_use + FD_RESERVE + FDS_PER_PROCESS * instances <= self.file_limit:
            return
        raise OutOfDescriptors("the daemon's file limit (%d descriptors) leaves no room for %d more "
                               "process(es): %d are managed; raise it (ulimit -n, or LimitNOFILE= under "
                               "systemd) and restart the daemon" % (self.file_limit, instances, len(self.registry)))

    def process_room(self) -> int:
        """How many processes the file limit leaves room for (each may hold FDS_PER_PROCESS),
        beside what the daemon held when it began and FD_RESERVE for connections and files."""
        if self.file_limit is None:
            return MAX_PROCESSES
        return max(0, (self.file_limit - self.fds_at_start - FD_RESERVE) // FDS_PER_PROCESS)

    def managed_groups(self, but: Optional[int] = None) -> frozenset:
        """The process groups of every running process (their leaders' pids), but `but`."""
        return frozenset(runner.pid for runner in self.registry.runners() if runner.pid not in (None, but))

    def saved_header(self) -> dict:
        return {"version": STATE_FILE_VERSION, "pmdaemon": __version__, "next_id": self.registry.next_id}

    @staticmethod
    def saved_entry(runner: ProcessRunner) -> Tuple[dict, dict]:
        """(what matters after a restart, runtime details) of one process's saved entry."""
        return ({"id": runner.id, "name": runner.name, "instance": runner.instance, "port": runner.port,
                 "config": runner.config.to_dict(), "status": runner.desired_status(), "error": runner.error,
                 "run_token": runner.run_token, "manual_restarts": runner.manual_restarts},
                {"restarts": runner.restarts, "pid": runner.pid,
                 "pid_start_ticks": runner.run.start_ticks if runner.run else None})

    async def restore(self, handed_over: Optional[dict] = None) -> None:
        """Bring back the saved list: leftovers of the last run are stopped, online ones started;
        after an upgrade, the runs the previous image handed over (by id) are adopted instead."""
        handed_over = dict(handed_over or {})
        data = self.store.load()
        if data is None:
            return close_handed_over(handed_over)
        self.registry.next_id = _saved_int(data.get("next_id", 0), 1 << 30)
        to_start, leftovers, rejected, adopted = [], [], [], []
        for entry in data["processes"]:
            try:
                # Saved configs are validated like new ones: a hand-edited file (or one an older
                # version wrote) cannot smuggle in what would fail later, deep in the supervisor.
                check_no_surrogates(entry["config"])
                config = ProcessConfig.from_dict(entry["config"], check_cwd=False)
                port, status = entry.get("port"), entry.get("status")
                runner = self._register(config, _saved_int(entry.get("instance", 0), MAX_INSTANCES),
                                        port if _is_int(port) else None,
                                        process_id=_saved_int(entry["id"], 1 << 30),
                                        state=ProcessState.ERRORED if status == "errored" else ProcessState.STOPPED)
            except (KeyError, TypeError, ValueError, PMDaemonError) as exc:
                rejected.append(entry)
                log.error("cannot restore saved process %r: %s", log_safe(str(entry.get("name")))
                          if isinstance(entry, dict) else None, exc)
                if isinstance(entry, dict) and (entry.get("pid") or entry.get("run_token")):
                    # What it left running is stopped all the same, with the default kill_signal
                    # and kill_timeout: a rejected entry must not leave an orphan behind.
                    leftovers.append((Run(entry.get("run_token"), entry.get("pid"), entry.get("pid_start_ticks")),
                                      ProcessConfig(log_safe(str(entry.get("name")), 64), "")))
                continue
            leftover = runner.restore(entry)
            handed = handed_over.pop(str(runner.id), None)
            if handed is not None:
                adopted.append((runner, handed))
                continue
            if leftover is not None:
                leftovers.append((leftover, config))
            if status == "online":
                to_start.append(runner)
        if rejected:
            self.store.keep_rejected(rejected)
        close_handed_over(handed_over)          # runs of entries that are gone are leftovers
        for runner, handed in adopted:
            try:
                await runner.adopt(handed)
            except Exception as exc:
                log.error("cannot adopt %r (pid %s)", log_safe(runner.name), handed["pid"], exc_info=exc)
        stopped = await asyncio.gather(*(self._stop_leftover(run, config) for run, config in leftovers),
                                       return_exceptions=True)
        for (_, config), outcome in zip(leftovers, stopped):
            if isinstance(outcome, Exception):
                log.error("cannot stop what %s left running", log_safe(config.name), exc_info=outcome)
        for runner in to_start:
            try:
                await runner.start()
            except Exception as exc:        # one entry must not take the daemon and the others down
                log.error("cannot start restored process %r", log_safe(runner.name), exc_info=exc)
        self.store.flush()

    async def _stop_leftover(self, run: Run, config: ProcessConfig) -> None:
        """Processes of a daemon that died: its child if (pid, start time) still names it, and
        everything carrying that run's PMDAEMON_RUN_ID."""
        run.pidfd = open_pidfd(run.pid) if _is_int(run.pid) and run.pid > 0 else None
        stat = self.sampler.stat(run.pid) if _is_int(run.pid) and run.pid > 0 else None
        leader_alive = bool(stat and stat.start_ticks == run.start_ticks and stat.pgid == run.pid
                            and run.pidfd is not None)      # without a pidfd: member by member
        if not leader_alive:
            run.close()
            run.pid = None
        if not leader_alive and not escapees(self.sampler, None, run.token):
            return                      # all gone, or the pid now belongs to someone else
        log.info("stopping what %s left running under a previous daemon (%s)", config.name,
                 "pid %d" % run.pid if run.pid else "found by %s=%s" % (RUN_ID_ENV, run.token))
        await terminate_run(run, config, self.sampler, self.settings, leader_alive)
        run.close()

    async def hand_over(self) -> dict:
        """Upgrade, before the exec: every run stops being followed (its output logged up to
        its last whole line), the state is saved, and the runs are described by id for
        restore(handed_over) in the next image. The children are not touched."""
        runners = [runner for runner in self.registry.runners() if runner.run is not None]
        await asyncio.gather(*(runner.quiesce() for runner in runners))
        self.store.flush()
        return {str(runner.id): runner.handed_over() for runner in runners}

    async def shutdown(self) -> None:
        """Daemon exit: stop every child, but remember which ones should come back."""
        await asyncio.gather(*(runner.shut_down() for runner in self.registry.runners()))
        if self._cgroups is not None:
            self._cgroups.remove_all()          # empty now: nothing is left behind
        self.hub.end(None)
        self.store.flush()
        self.sampler.close()


def close_handed_over(handed_over: dict) -> None:
    """The descriptors of handed-over runs that nobody adopts."""
    for handed in handed_over.values():
        for descriptor in list(handed["descriptors"]) + [handed["pidfd"]]:
            if descriptor is not None:
                with contextlib.suppress(OSError):
                    os.close(descriptor)


def group_label(members: List[ProcessRunner]) -> str:
    """The name to show in messages: the process's name even when addressed by id."""
    return members[0].name if len(members) == 1 else members[0].config.name


# ==============================================================================================
# 7. HTTP/1.1 codec (RFC 9112)
#    RequestParser is fed bytes and hands out heads, then complete requests, in order, or
#    None when it needs more, or raises HttpError with the status to answer (always closing).
#    serialize_response turns a Response into bytes. No sockets, no asyncio.
# ==============================================================================================

TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
TOKEN_RE = re.compile(rb"[" + TCHAR + rb"]+\Z")
REQUEST_LINE_RE = re.compile(rb"([" + TCHAR + rb"]+) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])\Z")
FIELD_VALUE_RE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*\Z")
HEAD_END_RE = re.compile(rb"\r?\n\r?\n")
REQUEST_LINE_JUNK_RE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\xff]|\r[^\n]")  # never in a request line
QUOTED_STRING = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
# chunk-size [ chunk-ext ]: 1*HEXDIG, then *( BWS ";" BWS name [ BWS "=" BWS token / quoted ) ]
CHUNK_LINE_RE = re.compile(rb"([0-9A-Fa-f]{1,15})((?:[ \t]*;[ \t]*[" + TCHAR + rb"]+(?:[ \t]*=[ \t]*(?:[" + TCHAR
                           + rb"]+|" + QUOTED_STRING + rb"))?)*)\Z")
HOST_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%!$&'()*+,;=-]*)(:[0-9]{0,5})?\Z", re.ASCII)

REASONS = {
    101: "Switching Protocols", 200: "OK", 201: "Created", 204: "No Content",
    304: "Not Modified", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
    413: "Content Too Large", 414: "URI Too Long", 415: "Unsupported Media Type",
    426: "Upgrade Required", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


def http_error(status: int, code: str, message: str) -> HttpError:
    """A framing-level error: after answering it the connection is closed."""
    return HttpError(status, code, message, close=True)


class Request:
    """One parsed HTTP request; header names are lowercase."""
    __slots__ = ("method", "target", "path", "query", "version", "headers", "fields", "body",
                 "keep_alive", "content_length", "chunked", "route", "params", "authority", "access",
                 "owner", "holder")

    def __init__(self, method: str, target: str, path: str, query: str, version: str,
                 headers: List[Tuple[str, str]]):
        self.method, self.target, self.path, self.query = method, target, path, query
        self.version, self.headers = version, headers
        self.fields: Dict[str, List[str]] = {}      # name -> values, in order of arrival
        for name, value in headers:
            self.fields.setdefault(name, []).append(value)
        self.body = b""
        self.keep_alive = True
        self.content_length = 0
        self.chunked = False
        self.route: Any = None          # the Route, once the API has admitted the head
        self.params: Dict[str, str] = {}        # the route's parameters taken from the path
        self.authority: Optional[str] = None    # host[:port] of an absolute-form target
        self.access = "full"                    # or "read": what the request's key allows
        self.owner = False                      # came through the Unix socket from the daemon's user or root
        self.holder = ""                        # which key it sent: "full", "read-N" ("" for none)

    def header(self, name: str, default: Optional[str] = None) -> Optional[str]:
        values = self.fields.get(name)
        return values[0] if values else default

    def header_values(self, name: str) -> List[str]:
        return self.fields.get(name, [])

    def tokens(self, name: str) -> List[str]:
        """Comma-separated tokens of all fields `name`, lowercase (Connection, Upgrade...)."""
        return [item.strip(" \t").lower() for value in self.header_values(name)
                for item in value.split(",") if item.strip(" \t")]


def parse_head(head: bytes) -> Request:
    """Parse a request line and header block (without the final empty line)."""
    lines = head.split(b"\n")
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    method, target, version = parse_request_line(lines[0])
    if len(lines) - 1 > MAX_HEADER_COUNT:
        raise http_error(431, "HEADERS_TOO_LARGE", "more than %d header fields" % MAX_HEADER_COUNT)
    headers = [parse_header_line(line) for line in lines[1:]]
    path, query, authority = parse_target(method, target)
    request = Request(method, target, path, query, "HTTP/%d.%d" % version, headers)
    request.authority = authority
    try:
        apply_framing(request)
    except HttpError as error:
        error.request = request         # the head is known: the answer can carry CORS headers
        raise
    return request


def parse_request_line(line: bytes) -> Tuple[str, str, Tuple[int, int]]:
    """(method, target, (major, minor)) of a request line without its line ending."""
    if len(line) > MAX_REQUEST_LINE:
        raise http_error(414, "URI_TOO_LONG", "request line is longer than %d bytes" % MAX_REQUEST_LINE)
    match = REQUEST_LINE_RE.match(line)
    if not match:
        raise http_error(400, "BAD_REQUEST", "malformed request line %r" % line[:100].decode("latin-1"))
    method = match.group(1).decode("ascii")
    version = (int(match.group(3)), int(match.group(4)))
    if version not in ((1, 0), (1, 1)):
        raise http_error(505, "HTTP_VERSION_NOT_SUPPORTED", "HTTP/%d.%d is not supported; use HTTP/1.1" % version)
    return method, match.group(2).decode("ascii"), version


def parse_header_line(line: bytes) -> Tuple[str, str]:
    if line[:1] in (b" ", b"\t"):
        raise http_error(400, "BAD_REQUEST", "obsolete line folding in headers is not allowed")
    name, colon, value = line.partition(b":")
    if not colon:
        raise http_error(400, "BAD_REQUEST", "header line without a colon: %r" % line[:100].decode("latin-1"))
    if not TOKEN_RE.match(name):
        if name.rstrip(b" \t") != name:
            raise http_error(400, "BAD_REQUEST", "whitespace before the colon in header %r"
                             % name.strip().decode("latin-1"))
        raise http_error(400, "BAD_REQUEST", "invalid header name %r" % name[:100].decode("latin-1"))
    value = value.strip(b" \t")
    if not FIELD_VALUE_RE.match(value):
        raise http_error(400, "BAD_REQUEST", "invalid character (CR, LF, NUL or control) in header %r"
                         % name.decode("ascii"))
    return name.decode("ascii").lower(), value.decode("latin-1")


def parse_target(method: str, target: str) -> Tuple[str, str, Optional[str]]:
    """(decoded path, raw query, authority) of origin-form, absolute-form or "*" (OPTIONS
    only); the authority is None unless the target is in absolute-form."""
    if target == "*":
        if method != "OPTIONS":
            raise http_error(400, "BAD_REQUEST", "request target '*' is only valid for OPTIONS")
        return "*", "", None
    authority = None
    if not target.startswith("/"):
        if not target.lower().startswith(("http://", "https://")):
            raise http_error(400, "BAD_REQUEST", "invalid request target %r" % target[:100])
        parts = urllib.parse.urlsplit(target)
        authority = parts.netloc
        if "@" in authority or not HOST_RE.match(authority):
            raise http_error(400, "BAD_REQUEST", "invalid authority in request target %r" % target[:100])
        target = parts._replace(scheme="", netloc="").geturl() or "/"
    raw_path, _, query = target.partition("?")
    if "#" in raw_path:
        raise http_error(400, "BAD_REQUEST", "request target must not contain a fragment")
    if "%" not in raw_path:
        return raw_path, query, authority
    try:
        path = urllib.parse.unquote(raw_path, errors="strict")
    except UnicodeDecodeError:
        raise http_error(400, "BAD_REQUEST", "request path is not valid UTF-8 once decoded") from None
    if "\x00" in path:
        raise http_error(400, "BAD_REQUEST", "request path must not contain NUL")
    return path, query, authority


def apply_framing(request: Request) -> None:
    """Host, body framing and Connection rules of RFC 9112 §3.2, §6 and §9.3."""
    fields = request.fields
    hosts = fields.get("host", ())
    if len(hosts) > 1:
        raise http_error(400, "BAD_REQUEST", "more than one Host header")
    if not hosts and request.version == "HTTP/1.1":
        raise http_error(400, "BAD_REQUEST", "missing Host header (required by HTTP/1.1)")
    if hosts and not HOST_RE.match(hosts[0]):
        raise http_error(400, "BAD_REQUEST", "invalid Host header %r" % hosts[0][:100])
    if "transfer-encoding" in fields:
        apply_transfer_encoding(request)
    elif "content-length" in fields:
        apply_content_length(request)
    connection = request.tokens("connection") if "connection" in fields else ()
    if request.version == "HTTP/1.1":
        request.keep_alive = "close" not in connection
    else:
        request.keep_alive = "keep-alive" in connection and "close" not in connection


def apply_transfer_encoding(request: Request) -> None:
    """Only "chunked" is supported, alone; never with Content-Length, never in HTTP/1.0."""
    if request.version == "HTTP/1.0":
        raise http_error(400, "BAD_REQUEST", "Transfer-Encoding is not allowed in HTTP/1.0")
    if "content-length" in request.fields:
        raise http_error(400, "BAD_REQUEST", "Content-Length together with Transfer-Encoding")
    codings = request.tokens("transfer-encoding")
    unknown = [coding for coding in codings if coding != "chunked"]
    if unknown:
        raise http_error(501, "NOT_IMPLEMENTED", "transfer coding %r is not supported" % unknown[0])
    if codings != ["chunked"]:
        raise http_error(400, "BAD_REQUEST", "invalid Transfer-Encoding %r"
                         % ", ".join(request.header_values("transfer-encoding")))
    request.chunked = True


def apply_content_length(request: Request) -> None:
    """Digits only; repeated values must agree; the limit is decided before reading the body."""
    values = request.header_values("content-length")
    lengths = [item.strip(" \t") for value in values for item in value.split(",")]   # only SP/HTAB
    if not all(is_ascii_digits(item) and len(item) <= 18 for item in lengths):
        raise http_error(400, "BAD_REQUEST", "invalid Content-Length %r" % ", ".join(values)[:100])
    if len(set(int(item) for item in lengths)) > 1:
        raise http_error(400, "BAD_REQUEST", "conflicting Content-Length values")
    request.content_length = int(lengths[0])
    if request.content_length > MAX_BODY_BYTES:
        raise http_error(413, "PAYLOAD_TOO_LARGE", "request body of %d bytes is larger than "
                         "the %d byte limit" % (request.content_length, MAX_BODY_BYTES))


class ContentLengthReader:
    """The body of one request framed by Content-Length (RFC 9112 §6.2)."""
    __slots__ = ("length",)

    def __init__(self, length: int):
        self.length = length

    def read(self, buffer: bytearray) -> Optional[bytes]:
        """The whole body once buffered (taken out of buffer), else None."""
        if len(buffer) < self.length:
            return None
        body = bytes(buffer[:self.length])
        del buffer[:self.length]
        return body


class ChunkedReader:
    """The body of one request in chunked coding (RFC 9112 §7.1): strict CRLFs, chunk sizes
    of hex digits only, extensions as the grammar allows, a cap on chunks and bytes. Each byte
    is looked at a bounded number of times, so a body costs time linear in its size."""
    __slots__ = ("max_body", "state", "remaining", "chunks", "size", "count", "trailer_bytes")

    def __init__(self, max_body: int):
        self.max_body = max_body
        self.state = "size"                 # size -> data -> data-end -> size ... -> trailer
        self.remaining = 0
        self.chunks: List[bytes] = []
        self.size = 0
        self.count = 0
        self.trailer_bytes = 0

    def read(self, buffer: bytearray) -> Optional[bytes]:
        while True:
            if self.state == "data":
                if not buffer:
                    return None
                piece = bytes(buffer[:self.remaining])
                del buffer[:len(piece)]
                self.chunks.append(piece)
                self.remaining -= len(piece)
                if self.remaining:
                    return None
                self.state = "data-end"
            if self.state == "data-end":
                if len(buffer) < 2:
                    if buffer[:1] not in (b"", b"\r"):
                        raise http_error(400, "BAD_REQUEST", "chunk data not followed by CRLF")
                    return None
                if buffer[:2] != b"\r\n":
                    raise http_error(400, "BAD_REQUEST", "chunk data not followed by CRLF")
                del buffer[:2]
                self.state = "size"
            line = take_crlf_line(buffer, MAX_CHUNK_LINE if self.state == "size" else MAX_HEADER_BYTES)
            if line is None:
                return None
            if self.state == "size":
                self._start_chunk(line)
            elif line == b"":                    # end of the (ignored) trailer section
                return b"".join(self.chunks)
            else:
                self.trailer_bytes += len(line)
                if self.trailer_bytes > MAX_HEADER_BYTES:
                    raise http_error(431, "HEADERS_TOO_LARGE", "trailer section is too large")
                parse_header_line(line)

    def _start_chunk(self, line: bytes) -> None:
        match = CHUNK_LINE_RE.match(line)
        if not match:
            raise http_error(400, "BAD_REQUEST", "invalid chunk size line %r" % line[:40].decode("latin-1"))
        size = int(match.group(1), 16)
        self.size += size
        self.count += 1
        if self.size > self.max_body:
            raise http_error(413, "PAYLOAD_TOO_LARGE", "chunked request body is larger than "
                             "the %d byte limit" % self.max_body)
        if self.count > MAX_BODY_CHUNKS:
            raise http_error(413, "PAYLOAD_TOO_LARGE", "chunked request body has more than %d chunks"
                             % MAX_BODY_CHUNKS)
        self.remaining = size
        self.state = "data" if size else "trailer"


def take_crlf_line(buffer: bytearray, limit: int) -> Optional[bytes]:
    """A line ended by CRLF taken out of buffer (without it); None until it is complete.
    Chunked framing allows no bare LF and no bare CR (RFC 9112 §7.1, §2.2)."""
    end = buffer.find(b"\n", 0, limit + 2)
    if end == -1:
        if len(buffer) > limit + 1:
            raise http_error(400, "BAD_REQUEST", "chunk line is longer than %d bytes" % limit)
        return None
    if end == 0 or buffer[end - 1] != 0x0D:
        raise http_error(400, "BAD_REQUEST", "bare LF in chunked framing (CRLF required)")
    line = bytes(buffer[:end - 1])
    del buffer[:end + 1]
    if b"\r" in line:
        raise http_error(400, "BAD_REQUEST", "bare CR in chunked framing")
    return line


class RequestParser:
    """Incremental request reader: feed() bytes, then next_request() until it returns None.

    head() hands out a request whose head is complete before its body is read, so access can
    be decided from the header block alone; each request gets a fresh body reader, so nothing
    of one request's framing leaks into the next on a keep-alive connection."""

    __slots__ = ("buffer", "max_body", "_request", "_body", "_scanned", "_line_checked")

    def __init__(self, max_body: int = MAX_BODY_BYTES):
        self.buffer = bytearray()
        self.max_body = max_body
        self._request: Optional[Request] = None      # head parsed, body pending
        self._body: Any = None                       # its ContentLengthReader or ChunkedReader
        self._scanned = 0                            # bytes already searched for the head end
        self._line_checked = False                   # request line of the pending head validated

    def feed(self, data: bytes) -> None:
        self.buffer += data

    @property
    def in_body(self) -> bool:
        return self._request is not None

    @property
    def has_partial(self) -> bool:
        return self._request is not None or bool(self.buffer)

    def head_or_none(self) -> Optional[Request]:
        """The pending head, without parsing anything more (for error answers)."""
        return self._request

    def head(self) -> Optional[Request]:
        """The request whose head is complete and whose body is still to come, if any."""
        if self._request is None:
            self._read_head()
        return self._request

    def next_request(self) -> Optional[Request]:
        request = self.head()
        if request is None:
            return None
        body = self._body.read(self.buffer)
        if body is None:
            return None
        request.body = body
        self._request = self._body = None
        return request

    def _read_head(self) -> None:
        if not self.buffer:
            return
        # RFC 9112 §2.2: ignore empty lines before a request line.
        while self.buffer[:2] == b"\r\n" or self.buffer[:1] == b"\n":
            del self.buffer[:2 if self.buffer[:1] == b"\r" else 1]
        match = HEAD_END_RE.search(self.buffer, max(0, self._scanned - 3))
        if match is None:
            self._scanned = len(self.buffer)
            self._check_head_size()
            return
        if match.start() > MAX_HEADER_BYTES + MAX_REQUEST_LINE:
            self._check_head_size()
        head = bytes(self.buffer[:match.start()])
        del self.buffer[:match.end()]
        self._scanned, self._line_checked = 0, False
        request = parse_head(head)
        self._body = ChunkedReader(self.max_body) if request.chunked else ContentLengthReader(request.content_length)
        self._request = request

    def _check_head_size(self) -> None:
        """While a head is incomplete: answer a bad request line now, not at the timeout."""
        line_end = self.buffer.find(b"\n", 0, MAX_REQUEST_LINE + 2)
        if line_end == -1 and len(self.buffer) > MAX_REQUEST_LINE + 1:
            raise http_error(414, "URI_TOO_LONG", "request line is longer than %d bytes" % MAX_REQUEST_LINE)
        if line_end >= 0 and not self._line_checked:
            parse_request_line(bytes(self.buffer[:line_end]).rstrip(b"\r"))
            self._line_checked = True
        elif line_end < 0 and REQUEST_LINE_JUNK_RE.search(self.buffer):
            raise http_error(400, "BAD_REQUEST", "malformed request line (control or non-ASCII bytes)")
        if len(self.buffer) - max(line_end, 0) > MAX_HEADER_BYTES:
            raise http_error(431, "HEADERS_TOO_LARGE", "header block is larger than %d bytes"
                             % MAX_HEADER_BYTES)


class Response:
    """What a handler returns; serialize_response makes the bytes."""
    __slots__ = ("status", "body", "content_type", "headers", "close", "stream", "cache")

    def __init__(self, status: int = 200, body: bytes = b"", content_type: Optional[str] = "application/json",
                 headers: List[Tuple[str, str]] = None, close: bool = False, stream: Any = None,
                 cache: str = "no-store"):
        self.status = status
        self.body = body
        self.content_type = content_type if body or stream or status not in (101, 204, 304) else None
        self.headers = headers if headers is not None else []
        self.close = close
        self.stream = stream       # an async iterator of bytes: sent chunked, body unused
        self.cache = cache         # Cache-Control: live data is never stored


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def json_response(status: int, value: Any, headers: Optional[List[Tuple[str, str]]] = None) -> Response:
    return Response(status, json_bytes(value), headers=headers)


# Sent on every response: the spec's security headers, and no caching of live data.
FIXED_HEADERS = (b"X-Content-Type-Options: nosniff\r\nX-Frame-Options: DENY\r\n"
                 b"X-XSS-Protection: 1; mode=block\r\n")
STATUS_LINES = {status: ("HTTP/1.1 %d %s\r\n" % (status, reason)).encode() for status, reason in REASONS.items()}


def serialize_response(response: Response, date: bytes, keep_alive: bool, http10: bool = False,
                       head_only: bool = False) -> bytes:
    """Status line, headers (Date, type, length, security, extra, Connection) and body."""
    parts = [STATUS_LINES.get(response.status) or b"HTTP/1.1 %d Unknown\r\n" % response.status,
             b"Date: ", date, b"\r\n", FIXED_HEADERS, b"Cache-Control: ", response.cache.encode(), b"\r\n"]
    if response.content_type:
        parts += [b"Content-Type: ", response.content_type.encode("latin-1"), b"\r\n"]
    if response.stream is not None:
        if not http10:
            parts.append(b"Transfer-Encoding: chunked\r\n")
    elif response.status >= 200 and response.status not in (204, 304):
        parts += [b"Content-Length: ", str(len(response.body)).encode(), b"\r\n"]
    for name, value in response.headers:
        parts += [name.encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n"]
    if response.status != 101:
        if not keep_alive:
            parts.append(b"Connection: close\r\n")
        elif http10:
            parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    if not head_only and response.status not in (204, 304):
        parts.append(response.body)
    return b"".join(parts)


# ==============================================================================================
# 8. WebSocket codec (RFC 6455)
#    check_handshake validates an upgrade request (client_handshake, check_handshake_reply: the
#    client's side); WsProtocol, either side, is fed bytes and returns events, queueing the
#    bytes it must answer (pong, close echo) in .outgoing; a violation ends the list with an
#    "error" event carrying a WebSocketError and its close code (events parsed before it are
#    kept, so a valid message is still answered). No sockets, no asyncio.
# ==============================================================================================

# RFC 6455 §7.4.1, and 1012-1014 of the IANA registry (1012: service restart, sent by an upgrade).
VALID_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


def ws_accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode("ascii")).digest()).decode("ascii")


def check_handshake(request: Request) -> str:
    """Validate an opening handshake (RFC 6455 §4.2.1); return the accept value."""
    if request.method != "GET" or request.version != "HTTP/1.1":
        raise BadRequest("a WebSocket handshake must be an HTTP/1.1 GET")
    if "websocket" not in request.tokens("upgrade") or "upgrade" not in request.tokens("connection"):
        raise BadRequest("expected 'Upgrade: websocket' and 'Connection: Upgrade'")
    if request.header_values("sec-websocket-version") != ["13"]:
        raise HttpError(426, "UPGRADE_REQUIRED", "unsupported Sec-WebSocket-Version; use 13",
                       headers=(("Sec-WebSocket-Version", "13"),))
    keys = request.header_values("sec-websocket-key")
    try:
        decoded = base64.b64decode(keys[0], validate=True) if len(keys) == 1 else b""
    except ValueError:
        decoded = b""
    if len(decoded) != 16:
        raise BadRequest("Sec-WebSocket-Key must be base64 of 16 bytes")
    if request.body or request.chunked:
        raise BadRequest("a WebSocket handshake has no body")
    return ws_accept_key(keys[0])


def handshake_headers(accept: str) -> List[Tuple[str, str]]:
    """The headers of the 101 answer (RFC 6455 §4.2.2); serialize_response adds the rest."""
    return [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", accept)]


def client_handshake(path: str, host: str, fields: Optional[Dict[str, str]] = None) -> Tuple[bytes, str]:
    """A client's opening handshake (RFC 6455 §4.1) and the key it sent; `fields` add to the
    headers or replace them (an empty value leaves one out)."""
    headers = {"Host": host, "Upgrade": "websocket", "Connection": "Upgrade",
               "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode("ascii"), "Sec-WebSocket-Version": "13"}
    headers.update(fields or {})
    lines = "".join("%s: %s\r\n" % item for item in headers.items() if item[1])
    return ("GET %s HTTP/1.1\r\n%s\r\n" % (path, lines)).encode("latin-1"), headers["Sec-WebSocket-Key"]


def check_handshake_reply(head: bytes, key: str) -> int:
    """The status of the server's answer to our handshake (its head, without the empty line);
    a 101 must upgrade to websocket with the accept value of our key (RFC 6455 §4.1)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise WebSocketError("not an HTTP answer: %r" % lines[0][:80])
    status = int(parts[1])
    if status == 101:
        fields = {name.strip().lower(): value.strip() for name, _, value in
                  (line.partition(b":") for line in lines[1:])}
        if fields.get(b"upgrade", b"").lower() != b"websocket":
            raise WebSocketError("101 without 'Upgrade: websocket'")
        if fields.get(b"sec-websocket-accept") != ws_accept_key(key).encode("ascii"):
            raise WebSocketError("101 without the Sec-WebSocket-Accept of our key")
    return status


def apply_mask(data: bytes, mask: bytes) -> bytes:
    """XOR with the 4-byte mask (RFC 6455 §5.3), as one big-integer operation for speed."""
    length = len(data)
    if not length:
        return b""
    key = (mask * (length // 4 + 1))[:length]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(length, "big")


def encode_frame(opcode: int, payload: bytes = b"", fin: bool = True, mask: Optional[bytes] = None) -> bytes:
    """One frame; servers send unmasked frames, clients (our tests) pass a mask."""
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if mask is not None else 0
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", first, mask_bit | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, length)
    if mask is not None:
        return head + mask + apply_mask(payload, mask)
    return head + payload


def encode_close(code: int, reason: str = "", mask: Optional[bytes] = None) -> bytes:
    return encode_frame(Opcode.CLOSE, struct.pack("!H", code) + reason.encode("utf-8")[:123], mask=mask)


class WsEvent(NamedTuple):
    kind: str           # "text", "binary", "ping", "pong", "close", "error"
    data: Any           # str, bytes, (code, reason) for "close", WebSocketError for "error"


class WsProtocol:
    """One side of a WebSocket connection, without I/O: the server's (the daemon), or with
    client=True the client's (the CLI, the tests), which masks what it sends and expects
    unmasked frames (RFC 6455 §5.1)."""
    __slots__ = ("max_message", "max_fragments", "client", "buffer", "outgoing", "state", "failure", "_skip",
                 "_probe", "_probed", "_opcode", "_parts", "_size", "_fragments", "_decoder")

    def __init__(self, max_message: int = MAX_WS_MESSAGE, max_fragments: int = MAX_WS_FRAGMENTS,
                 client: bool = False):
        self.max_message = max_message
        self.max_fragments = max_fragments      # frames of one message: empty ones cost too
        self.client = client
        self.buffer = bytearray()
        self.outgoing: List[bytes] = []
        self.state = WsState.OPEN
        self.failure: Optional[WebSocketError] = None   # the peer's violation, once found
        self._skip = 0                          # bytes of a refused frame still to discard
        self._probe = None                      # UTF-8 check of a text frame still arriving
        self._probed = 0
        self._opcode: Optional[int] = None      # opcode of the fragmented message in progress
        self._parts: List[Any] = []
        self._size = 0
        self._fragments = 0
        self._decoder = None

    def receive_data(self, data: bytes) -> List[WsEvent]:
        """Parse frames from data; a violation ends the list with an "error" event."""
        self.buffer += data
        if self.failure is not None:
            return self._await_close()
        events = []
        while not self.close_received and self.failure is None:
            try:
                frame = self._next_frame()
                if frame is None:
                    break
                event = self._handle_frame(*frame)
            except WebSocketError as error:
                self.failure = error
                self._opcode, self._parts, self._size, self._fragments = None, [], 0, 0
                self._skip_after_failure()
                event = WsEvent("error", error)
            if event is not None:
                events.append(event)
        return events

    def _skip_after_failure(self) -> None:
        """Drop the offending frame: all of it when its length is known (1009), else the rest."""
        if self._skip:
            dropped = min(self._skip, len(self.buffer))
            del self.buffer[:dropped]
            self._skip -= dropped
        else:
            self.buffer.clear()

    def _await_close(self) -> List[WsEvent]:
        """After failing, only the peer's close frame still matters (RFC 6455 §7.1.7)."""
        if self._skip:
            self._skip_after_failure()
        while not self.close_received:
            try:
                frame = self._next_frame()
            except WebSocketError:
                self._skip = 0
                self.buffer.clear()
                return []
            if frame is None:
                return []
            if frame[1] == Opcode.CLOSE:
                self._closed_by(peer=True)
                return [WsEvent("close", (1005, ""))]
        return []

    def _next_frame(self) -> Optional[Tuple[bool, int, bytes]]:
        buffer = self.buffer
        if len(buffer) < 2:
            return None
        first, second = buffer[0], buffer[1]
        fin, opcode, length = bool(first & 0x80), first & 0x0F, second & 0x7F
        if first & 0x70:
            raise WebSocketError("reserved bits set without a negotiated extension")
        if opcode not in Opcode._value2member_map_:
            raise WebSocketError("unknown opcode %d" % opcode)
        masked = second & 0x80
        if not masked and not self.client:
            raise WebSocketError("client frame is not masked")
        if masked and self.client:
            raise WebSocketError("server frame is masked")
        if opcode >= 0x8:
            if opcode == Opcode.CLOSE and (not fin or length > MAX_WS_CONTROL_PAYLOAD):
                self._closed_by(peer=True)      # a bad close is still the peer's last frame
            if not fin:
                raise WebSocketError("fragmented control frame")
            if length > MAX_WS_CONTROL_PAYLOAD:
                raise WebSocketError("control frame payload larger than 125 bytes")
        offset = 2
        if length == 126:
            if len(buffer) < 4:
                return None
            length, offset = struct.unpack_from("!H", buffer, 2)[0], 4
        elif length == 127:
            if len(buffer) < 10:
                return None
            length, offset = struct.unpack_from("!Q", buffer, 2)[0], 10
            if length >> 63:
                raise WebSocketError("frame length has the most significant bit set")
        start = offset + 4 if masked else offset    # the payload, after the masking key if any
        if opcode < 0x8 and self._size + length > self.max_message:
            # Decided from the header, before buffering the payload (RFC 6455 §10.4).
            self._skip = start + length
            raise MessageTooBig("message larger than %d bytes" % self.max_message)
        end = start + length
        if len(buffer) < end:
            if opcode == Opcode.TEXT or (opcode == Opcode.CONTINUATION and self._opcode == Opcode.TEXT):
                self._probe_partial_text(opcode, offset, start)
            return None
        if masked:
            payload = apply_mask(bytes(buffer[start:end]), bytes(buffer[offset:start]))
        else:
            payload = bytes(buffer[start:end])
        del buffer[:end]
        self._probe, self._probed = None, 0
        return fin, opcode, payload

    def _probe_partial_text(self, opcode: int, offset: int, payload_start: int) -> None:
        """Check the UTF-8 of a text frame's payload as it trickles in, so invalid text fails
        at the offending byte rather than when the frame is complete (RFC 6455 §8.1)."""
        start = payload_start + self._probed
        if len(self.buffer) <= start:
            return
        if self._probe is None:
            self._probe = codecs.getincrementaldecoder("utf-8")()
            if opcode == Opcode.CONTINUATION and self._decoder is not None:
                self._probe.setstate(self._decoder.getstate())
        chunk = bytes(self.buffer[start:])
        if payload_start > offset:              # masked: the key, turned to where the probe is
            shift = self._probed % 4
            mask = bytes(self.buffer[offset:payload_start])
            chunk = apply_mask(chunk, mask[shift:] + mask[:shift])
        self._probed += len(chunk)
        try:
            self._probe.decode(chunk)
        except UnicodeDecodeError:
            raise InvalidUtf8("invalid UTF-8 in text message") from None

    def _handle_frame(self, fin: bool, opcode: int, payload: bytes) -> Optional[WsEvent]:
        if opcode == Opcode.PING:
            if not self.close_sent:
                self.outgoing.append(self.frame(Opcode.PONG, payload))
            return WsEvent("ping", payload)
        if opcode == Opcode.PONG:
            return WsEvent("pong", payload)
        if opcode == Opcode.CLOSE:
            return self._handle_close(payload)
        if opcode == Opcode.CONTINUATION:
            if self._opcode is None:
                raise WebSocketError("continuation frame without a message to continue")
        else:
            if self._opcode is not None:
                raise WebSocketError("new data frame inside a fragmented message")
            self._opcode = opcode
            self._decoder = codecs.getincrementaldecoder("utf-8")() if opcode == Opcode.TEXT else None
        self._size += len(payload)
        self._fragments += 1
        if self._fragments > self.max_fragments:
            raise TooManyFragments("message in more than %d frames" % self.max_fragments)
        if self._decoder is not None:
            try:   # checked per fragment so invalid UTF-8 fails fast (RFC 6455 §8.1)
                part = self._decoder.decode(payload, final=fin)
            except UnicodeDecodeError:
                raise InvalidUtf8("invalid UTF-8 in text message") from None
        else:
            part = payload
        if part:
            self._parts.append(part)
        if not fin:
            return None
        kind = "text" if self._opcode == Opcode.TEXT else "binary"
        message = ("" if kind == "text" else b"").join(self._parts)
        self._opcode, self._parts, self._size, self._fragments, self._decoder = None, [], 0, 0, None
        return WsEvent(kind, message)

    def _handle_close(self, payload: bytes) -> WsEvent:
        # Even an invalid close ends the peer's side: after our close the server drops TCP.
        self._closed_by(peer=True)
        if len(payload) == 1:
            raise WebSocketError("close frame with a 1-byte payload")
        code, reason = 1005, ""                 # 1005: no status code was present
        if payload:
            code = struct.unpack("!H", payload[:2])[0]
            if code not in VALID_CLOSE_CODES and not 3000 <= code <= 4999:
                raise WebSocketError("invalid close code %d" % code)
            try:
                reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidUtf8("invalid UTF-8 in close reason") from None
        if not self.close_sent:                 # echo the code (RFC 6455 §5.5.1)
            self._closed_by(us=True)
            self.outgoing.append(encode_close(code, mask=self._key()) if code != 1005 else self.frame(Opcode.CLOSE))
        return WsEvent("close", (code, reason))

    def close(self, code: int, reason: str = "") -> bytes:
        """The close frame to send when we start the closing handshake (b"" if already sent)."""
        if self.close_sent:
            return b""
        self._closed_by(us=True)
        return encode_close(code, reason, self._key())

    def frame(self, opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
        """One frame as this side sends it: a client masks each with a fresh key (RFC 6455 §5.3)."""
        return encode_frame(opcode, payload, fin, self._key())

    def _key(self) -> Optional[bytes]:
        return os.urandom(4) if self.client else None

    # The closing handshake (RFC 6455 §7): OPEN -> CLOSE_SENT or CLOSE_RECEIVED -> CLOSED.
    @property
    def close_sent(self) -> bool:
        return self.state in (WsState.CLOSE_SENT, WsState.CLOSED)

    @property
    def close_received(self) -> bool:
        return self.state in (WsState.CLOSE_RECEIVED, WsState.CLOSED)

    @property
    def failed(self) -> bool:
        return self.failure is not None

    def _closed_by(self, us: bool = False, peer: bool = False) -> None:
        sent, received = us or self.close_sent, peer or self.close_received
        self.state = (WsState.CLOSED if sent and received else WsState.CLOSE_SENT if sent
                      else WsState.CLOSE_RECEIVED)


# ==============================================================================================
# 9. API
#    AccessPolicy decides Host, Origin, API key and CORS (pure). Domain errors get their status
#    and code here (ERROR_WIRE_FORM), and error_response is the one place any error becomes a
#    response. Views shape processes for REST and WebSocket. Api maps (method, path) to handlers,
#    /ws included. Knows the Supervisor, never sockets.
# ==============================================================================================

LOOPBACK_NAMES = ("localhost",)
CORS_METHODS = "GET, POST, PATCH, DELETE, OPTIONS"
CORS_HEADERS = "Content-Type, Authorization, X-API-Key"


def split_host(value: str) -> str:
    """The host part of a Host header or URL authority, lowercase, without brackets or port."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def is_loopback_host(host: str) -> bool:
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BoundedCache(dict):
    """A dict that forgets everything when full: cheap memoisation of per-request decisions."""

    def __init__(self, limit: int = 4096):
        super().__init__()
        self.limit = limit

    def remember(self, key: Any, value: Any) -> Any:
        if len(self) >= self.limit:
            self.clear()
        self[key] = value
        return value


def key_digest(key: str) -> bytes:
    # Comparing digests keeps compare_digest constant-time even when the lengths differ.
    return hashlib.sha256(key.encode("utf-8")).digest()


class AccessPolicy:
    """Who may talk to the API: API key, Host (DNS rebinding) and Origin (CORS, CSWSH)."""

    def __init__(self, api_key: Optional[str], allow_hosts=(), cors_origins=(),
                 trusted_uids: Tuple[int, ...] = (), read_keys: Tuple[str, ...] = ()):
        self.key_digest = key_digest(api_key) if api_key else None
        self.read_digests = tuple(key_digest(key) for key in read_keys)   # may look, not act
        # Without a key, only these users may connect: loopback proves the machine, not the user.
        self.trusted_uids = frozenset(trusted_uids or (os.getuid(), 0))
        self.allow_hosts = {host.lower() for host in allow_hosts}
        self.cors_origins = {origin.rstrip("/").lower() for origin in cors_origins}
        self.own_origin: Optional[Tuple[str, int]] = None   # (scheme, port) the dashboard is served from
        self.own_hosts: frozenset = frozenset()             # the names and addresses it is served on
        self._host_verdicts = BoundedCache()
        self._origin_verdicts = BoundedCache()

    @property
    def checks_peers(self) -> bool:
        return self.key_digest is None

    def check_peer(self, uid: Optional[int]) -> None:
        """The connecting user must be the daemon's own (or root): on TCP without a key, and on
        the Unix socket always (the owner's door: it needs no key); fail closed."""
        if uid is None:
            raise HttpError(403, "FORBIDDEN_USER", "cannot tell which user opened this connection, "
                            "so it is refused; set an API key (--api-key-file or $%s) to allow "
                            "other clients" % API_KEY_ENV)
        if uid not in self.trusted_uids:
            raise HttpError(403, "FORBIDDEN_USER", "connections from other users (uid %d) are refused "
                            "without an API key; set one (--api-key-file or $%s) to allow them"
                            % (uid, API_KEY_ENV))

    def check_host(self, request: Request) -> None:
        """Without a key, only loopback Host names are served (stops DNS rebinding). The
        authority of an absolute-form target stands for Host (RFC 9112 §3.2.2)."""
        if self.key_digest is not None:
            return
        host = request.authority if request.authority is not None else request.header("host")
        if host is None:
            raise HttpError(403, "FORBIDDEN_HOST", "a request without Host is refused without an API key "
                            "(HTTP/1.0 clients: send a Host header)")
        allowed = self._host_verdicts.get(host)
        if allowed is None:
            name = split_host(host)
            allowed = self._host_verdicts.remember(host, is_loopback_host(name) or name in self.allow_hosts)
        if not allowed:
            raise HttpError(403, "FORBIDDEN_HOST", "Host %r is not allowed; without an API key only "
                           "loopback names are served (see --allow-host)" % host[:100])

    def origin_allowed(self, origin: str) -> bool:
        if self.key_digest is not None:
            return True
        verdict = self._origin_verdicts.get(origin)
        if verdict is None:
            verdict = self._origin_verdicts.remember(origin, self._judge_origin(origin))
        return verdict

    def serve_origin(self, scheme: str, port: int, addresses: List[str]) -> None:
        """Where the daemon itself is served (its dashboard's pages carry that origin): the
        addresses it holds on `port`, "localhost" only when it holds both 127.0.0.1 and ::1
        (else another user may listen on the other one, and a browser may ask that one first),
        and the --allow-host names (the operator's word)."""
        held = {address.split("%")[0].lower() for address in addresses}
        self.own_origin = (scheme, port)
        self.own_hosts = frozenset(held | ({"localhost"} if {"127.0.0.1", "::1"} <= held else set())
                                   | self.allow_hosts)
        self._origin_verdicts.clear()

    def _judge_origin(self, origin: str) -> bool:
        """Without a key: the daemon's own origin (serve_origin) and --cors-origin. Any other
        page, even one served from loopback by another user (127.0.0.2, ::1, the same port on
        an address we do not hold), would drive the daemon with the rights of whoever opened
        it in a browser."""
        normalised = origin.rstrip("/").lower()
        if normalised in self.cors_origins:
            return True
        try:
            parsed = urllib.parse.urlsplit(normalised)
            port = parsed.port or {"http": 80, "https": 443}.get(parsed.scheme)
        except ValueError:
            return False
        return (parsed.scheme, port) == self.own_origin and split_host(parsed.netloc) in self.own_hosts

    def check_origin(self, request: Request) -> None:
        if len(request.header_values("origin")) > 1:
            raise HttpError(400, "BAD_REQUEST", "more than one Origin header")
        origin = request.header("origin")
        if origin is not None and not self.origin_allowed(origin):
            raise HttpError(403, "FORBIDDEN_ORIGIN", "Origin %r is not allowed (see --cors-origin)"
                           % origin[:100])

    def check_key(self, request: Request, ticket_access: Optional[str] = None) -> str:
        """The access a request has: "full", or "read" for a read-only key (or the access of the
        key a redeemed ticket was issued to); 401 without a key. Sets request.holder. The
        owner's door (the Unix socket, checked by SO_PEERCRED) needs no key."""
        if self.key_digest is None or request.owner:
            return "full"
        if ticket_access is not None:
            return ticket_access
        supplied = request.header("x-api-key")
        authorization = request.header("authorization")
        if supplied is None and authorization is not None:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() == "bearer":
                supplied = token.strip()
        digest = key_digest(supplied) if supplied is not None else b""
        # Every digest is compared, whichever matches: the time says nothing about which.
        full = hmac.compare_digest(digest, self.key_digest)
        read = [hmac.compare_digest(digest, other) for other in self.read_digests]
        if full:
            request.holder = "full"
            return "full"
        if any(read):
            request.holder = "read-%d" % read.index(True)
            return "read"
        raise HttpError(401, "UNAUTHORIZED", "missing or invalid API key (send 'Authorization: "
                        "Bearer KEY' or 'X-API-Key: KEY')",
                        headers=(("WWW-Authenticate", 'Bearer realm="pmdaemon"'),))

    def cors_headers(self, request: Request, preflight: bool = False) -> List[Tuple[str, str]]:
        origin = request.header("origin")
        if origin is None or not self.origin_allowed(origin):
            return []
        headers = [("Access-Control-Allow-Origin", "*" if self.key_digest else origin)]
        if not self.key_digest:
            headers.append(("Vary", "Origin"))
        if preflight:
            headers += [("Access-Control-Allow-Methods", CORS_METHODS),
                        ("Access-Control-Allow-Headers", CORS_HEADERS),
                        ("Access-Control-Max-Age", "600")]
        return headers


class TicketBook:
    """Short-lived, single-use tickets that let a browser open /ws without the key in the URL.
    A ticket carries the access of the key it was issued to; each key holds a bounded number,
    and the read-only keys together another, so no read-only key can take the full key's."""

    def __init__(self, ttl: float = WS_TICKET_TTL, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.clock = clock
        self._tickets: Dict[str, Tuple[float, str, str]] = {}     # ticket -> (expiry, holder, access)

    def issue(self, holder: str = "", access: str = "full") -> str:
        now = self.clock()
        self._tickets = {t: entry for t, entry in self._tickets.items() if entry[0] > now}
        held = [entry[1] for entry in self._tickets.values() if entry[2] == access]
        if held.count(holder) >= MAX_WS_TICKETS_PER_KEY or (access == "read" and len(held) >= MAX_WS_TICKETS):
            raise HttpError(503, "TOO_MANY_TICKETS", "too many unused WebSocket tickets for this key; retry later")
        ticket = base64.urlsafe_b64encode(os.urandom(24)).rstrip(b"=").decode("ascii")
        self._tickets[ticket] = (now + self.ttl, holder, access)
        return ticket

    def redeem(self, ticket: str) -> Optional[str]:
        """The access the ticket grants, once; None for an unknown or expired ticket."""
        entry = self._tickets.pop(ticket, None)
        return entry[2] if entry is not None and entry[0] > self.clock() else None


class Access(enum.Enum):
    """Who may call a route; route() makes it the flags admit() applies."""
    PUBLIC = "public"       # the dashboard's files: no data, no key needed
    READ = "read"           # any key, a read-only one too
    ACTS = "acts"           # changes something: refused to a read-only key
    TICKET = "ticket"       # READ, or a single-use ticket in place of the key (/ws, for browsers)


class Operation(NamedTuple):
    """A route's OpenAPI description (openapi_document builds the document from these)."""
    summary: str
    status: int                         # the success answer: 2xx, or 101 for /ws
    response: Optional[str] = None      # its schema, a name in OPENAPI_SCHEMAS
    body: Optional[str] = None          # the request body's schema
    body_required: bool = True
    errors: Tuple[int, ...] = ()        # the 4xx/5xx it documents besides the generic 4XX
    extensions: Optional[dict] = None   # "x-" keys of the operation


class Route(NamedTuple):
    """A compiled row of the route table: what admission, dispatch, RepeatedAnswers and OpenAPI
    read. Rows are written with route(), which turns their Access into the three flags (plain
    fields, read on every request)."""
    method: str
    pattern: Any
    handler: Callable
    ticket_ok: bool = False         # /ws: a single-use ticket may stand in for the key
    acts: bool = False              # changes something: refused to a read-only key
    public: bool = False            # the dashboard's files: no data, no key needed
    template: str = ""
    snapshot: Optional[Callable[[], bytes]] = None   # body of a plain GET, for RepeatedAnswers
    doc: Optional[Operation] = None


def compile_route(template: str):
    return re.compile(re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template) + r"\Z", re.ASCII)


def route(method: str, template: str, handler: Callable, access: Access, doc: Operation,
          snapshot: Optional[Callable[[], bytes]] = None) -> Route:
    return Route(method, compile_route(template), handler, access is Access.TICKET, access is Access.ACTS,
                 access is Access.PUBLIC, template, snapshot, doc)


def message(text: str, **extra: Any) -> dict:
    body = {"success": True, "message": text}
    body.update(extra)
    return body


class InvalidJson(BadRequest):
    """A client's JSON that cannot be used: malformed, not UTF-8, or nested too deeply."""


def parse_json_text(data: Any) -> Any:
    """A client's JSON (bytes or str): any failure is an InvalidJson, never a 500, and nesting
    is limited to MAX_JSON_DEPTH (the C decoder's recursion guard is caught too)."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text)
    except UnicodeDecodeError:
        raise InvalidJson("not valid UTF-8") from None
    except RecursionError:
        raise InvalidJson("nested deeper than %d levels" % MAX_JSON_DEPTH) from None
    except ValueError as exc:
        raise InvalidJson("not valid JSON: %s" % exc) from None
    if json_depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise InvalidJson("nested deeper than %d levels" % MAX_JSON_DEPTH)
    if SURROGATE_ESCAPE_RE.search(text):
        check_no_surrogates(value)
    return value


def json_depth(value: Any, limit: int) -> int:
    """How deeply containers nest in value, counting no further than limit + 1."""
    depth, level = 0, [value]
    while level and depth <= limit:
        containers = [item for item in level if isinstance(item, (list, dict))]
        if not containers:
            break
        depth += 1
        level = [child for item in containers for child in (item.values() if isinstance(item, dict) else item)]
    return depth


def parse_json_body(request: Request, required: bool = True) -> Any:
    if not request.body:
        if required:
            raise BadRequest("request body required: a JSON object")
        return None
    try:
        return parse_json_text(request.body)
    except InvalidJson as exc:
        raise BadRequest("request body is " + exc.message) from None


def parse_query(query: str, allowed: Tuple[str, ...]) -> Dict[str, str]:
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query),
                                       errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("malformed query string") from None
    params: Dict[str, str] = {}
    for key, value in pairs:
        if key not in allowed:
            raise BadRequest("unknown query parameter %r (allowed: %s)" % (key[:40], ", ".join(allowed)))
        if key in params:
            raise BadRequest("query parameter %r given twice" % key)
        params[key] = value
    return params


# -- errors on the wire: the one place an error becomes a status, a code and bytes -------------

ERROR_WIRE_FORM: Dict[type, Tuple[int, str]] = {
    BadRequest: (400, "BAD_REQUEST"),
    ValidationError: (400, "VALIDATION_ERROR"),
    ProcessNotFound: (404, "PROCESS_NOT_FOUND"),
    AlreadyExists: (409, "PROCESS_ALREADY_EXISTS"),
    AlreadyRunning: (409, "PROCESS_ALREADY_RUNNING"),
    PortConflict: (409, "PORT_CONFLICT"),
    TooManyProcesses: (409, "TOO_MANY_PROCESSES"),
    OutOfDescriptors: (503, "OUT_OF_DESCRIPTORS"),
    ReloadStopped: (409, "RELOAD_STOPPED"),
    CannotStart: (422, "START_FAILED"),
    NotRunning: (409, "PROCESS_NOT_RUNNING"),
    StdinUnavailable: (409, "STDIN_UNAVAILABLE"),
    StdinBusy: (409, "STDIN_BUSY"),
    StateNotSaved: (507, "STATE_NOT_SAVED"),
}
INTERNAL_ERROR = HttpError(500, "INTERNAL_ERROR", "internal server error")


def wire_error(error: BaseException) -> HttpError:
    """Any error as an HttpError: domain errors by ERROR_WIRE_FORM, anything else a bare 500
    (the traceback goes to the daemon's log, never to the client)."""
    if isinstance(error, HttpError):
        return error
    form = next((ERROR_WIRE_FORM[kind] for kind in type(error).__mro__ if kind in ERROR_WIRE_FORM), None)
    if form is None:
        log.error("internal error", exc_info=error)
        return INTERNAL_ERROR
    return HttpError(form[0], form[1], error.message, error.details)


def error_body(error: HttpError) -> dict:
    """The spec's error format; the same object goes over WebSocket as an error's data."""
    body = {"code": error.code, "message": error.message}
    if error.details is not None:
        body["details"] = error.details
    return body


def error_response(error: BaseException, cors: List[Tuple[str, str]] = ()) -> Response:
    wire = wire_error(error)
    return Response(wire.status, json_bytes({"success": False, "error": error_body(wire)}),
                    headers=list(wire.headers) + list(cors), close=wire.close)


# -- views: how a process looks in REST bodies and WebSocket updates -----------------------------

def process_summary(runner: ProcessRunner, now: float) -> dict:
    """The entry of GET /api/processes."""
    return {"id": runner.id, "name": runner.name, "status": runner.state.value, "pid": runner.pid,
            "port": runner.port, "cpu": runner.cpu, "memory": runner.memory,
            "uptime": runner.uptime_ms(now), "restarts": runner.restarts, "health": runner.health.status}


def process_update(runner: ProcessRunner, wall: float, now: float) -> dict:
    """The data of a WebSocket process_update message: the summary, stamped."""
    data = process_summary(runner, now)
    data["timestamp"] = iso_time(wall)
    return data


def reported_fields(update: dict) -> tuple:
    """What a process_update says that can change while nothing happens to the process
    (uptime and the stamp follow from the clock alone)."""
    return tuple(value for key, value in update.items() if key not in ("uptime", "timestamp"))


def without_credentials(url: str) -> str:
    """A URL with its user:password@ masked: what a read-only key is shown."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return MASKED
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=MASKED + "@" + parts.netloc.rpartition("@")[2]))


def health_body(runner: ProcessRunner, full: bool = True) -> dict:
    check = runner.config.health_check
    target = health_target(check, runner.port) if check else None
    if target is not None and check["type"] == "http" and not full:
        target = without_credentials(target)
    return runner.health.to_api(check, target)


def process_details(runner: ProcessRunner, now: float, full: bool = True) -> dict:
    """GET /api/processes/{name_or_id}: the summary, the config and what happened last. Without
    full access (a read-only key) env values and URL credentials are masked."""
    entry = process_summary(runner, now)
    config = runner.config.to_dict()
    config["env"] = dict(config["env"])
    if runner.port is not None:
        config["env"]["PORT"] = str(runner.port)
    if not full:
        config["env"] = dict.fromkeys(config["env"], MASKED)
        check = config["health_check"]
        if check is not None and check["url"] is not None:
            check["url"] = without_credentials(check["url"])
    run = runner.run
    entry.update({
        "config": config,
        "instance": runner.instance,
        "started_at": iso_time(run.started_wall) if run is not None and run.started_wall else None,
        "last_exit": runner.last_exit,
        "error": runner.error,
        "next_restart_at": (iso_time(runner.next_restart_wall, milliseconds=True)
                            if runner.next_restart_wall else None),
        "log_files": {kind: runner.logs.files[kind].path for kind in LOG_TYPES},
        "log_write_errors": runner.logs.write_errors,
        "watching": runner.watch_status,
        "waiting_for": runner.waiting_for,
    })
    return entry


# -- the dashboard: one page, its stylesheet and script, nothing fetched from elsewhere ------------

DASHBOARD_HTML = r'''<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pmdaemon</title>
<link rel="stylesheet" href="/dashboard.css">
<script src="/dashboard.js" defer></script>
</head>
<body>
<header>
  <h1>pmdaemon</h1>
  <span id="connection" class="badge" role="status">connecting</span>
  <span id="access" class="badge"></span>
</header>
<form id="login" hidden>
  <label for="key">API key</label>
  <input id="key" type="password" autocomplete="current-password" required>
  <button type="submit">Use this key</button>
  <span id="login-error" class="error" role="alert"></span>
  <p class="hint">The key is kept in this tab only (sessionStorage).</p>
</form>
<main id="app" hidden>
  <section aria-label="System">
    <div class="charts">
      <figure><figcaption>CPU <span id="sys-cpu"></span></figcaption><canvas id="chart-cpu" width="300" height="60"></canvas></figure>
      <figure><figcaption>Memory <span id="sys-mem"></span></figcaption><canvas id="chart-mem" width="300" height="60"></canvas></figure>
      <figure><figcaption>Load <span id="sys-load"></span></figcaption><canvas id="chart-load" width="300" height="60"></canvas></figure>
    </div>
  </section>
  <section aria-label="Processes">
    <h2>Processes</h2>
    <div class="scroll">
      <table>
        <thead><tr><th>id</th><th>name</th><th>status</th><th>pid</th><th>port</th><th>cpu</th><th>memory</th><th>uptime</th><th>restarts</th><th>health</th><th>history</th><th class="acts">actions</th></tr></thead>
        <tbody id="processes"></tbody>
      </table>
    </div>
    <p id="action-error" class="error" role="alert"></p>
  </section>
  <section aria-label="New process" class="acts">
    <details>
      <summary>New process</summary>
      <form id="create">
        <label>name <input name="name" required></label>
        <label>script <input name="script" required></label>
        <label>args <input name="args" placeholder="space separated"></label>
        <label>cwd <input name="cwd"></label>
        <label>port <input name="port" placeholder="3000, 3000-3003, auto"></label>
        <label>instances <input name="instances" type="number" min="1" max="64" value="1"></label>
        <label>env <textarea name="env" rows="2" placeholder="KEY=value, one a line"></textarea></label>
        <button type="submit">Create</button>
        <span id="create-error" class="error" role="alert"></span>
      </form>
    </details>
  </section>
  <section aria-label="Logs">
    <h2>Logs <span id="log-name"></span></h2>
    <pre id="logs" tabindex="0" aria-live="polite"></pre>
  </section>
  <section aria-label="Events">
    <h2>Events</h2>
    <ol id="events"></ol>
  </section>
</main>
</body>
</html>
'''

DASHBOARD_CSS = r''':root { color-scheme: light dark; --ok: #1a7f37; --bad: #cf222e; --warn: #9a6700; --dim: #6e7781; }
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 auto; padding: 0 12px 24px; max-width: 1200px; }
header { display: flex; gap: 8px; align-items: center; flex-wrap: wrap; }
h1 { font-size: 20px; margin: 12px 8px 12px 0; } h2 { font-size: 16px; margin: 16px 0 6px; }
.badge { border: 1px solid var(--dim); border-radius: 10px; padding: 1px 8px; font-size: 12px; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; } figure { margin: 0; } figcaption { font-size: 12px; }
canvas { width: 300px; max-width: 100%; height: 60px; border: 1px solid #8884; }
.scroll { overflow-x: auto; } table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 4px 6px; border-bottom: 1px solid #8883; white-space: nowrap; }
tr.selected { background: #8882; } tr:focus { outline: 2px solid #0969da; }
.online, .healthy { color: var(--ok); } .errored, .unhealthy { color: var(--bad); }
.starting, .restarting, .stopping { color: var(--warn); } .stopped { color: var(--dim); }
button { font: inherit; padding: 2px 8px; margin: 1px; cursor: pointer; }
.error { color: var(--bad); } .hint { color: var(--dim); font-size: 12px; }
pre#logs { max-height: 320px; overflow: auto; background: #8881; padding: 6px; white-space: pre-wrap; word-break: break-all; }
ol#events { max-height: 200px; overflow: auto; padding-left: 20px; font-size: 13px; }
form#create { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 6px; margin-top: 6px; }
form#create label { display: flex; flex-direction: column; font-size: 12px; }
body.read-only .acts { display: none; }
@media (max-width: 600px) { th:nth-child(4), td:nth-child(4), th:nth-child(11), td:nth-child(11) { display: none; } }
'''

DASHBOARD_JS = r'''"use strict";
// The pmdaemon dashboard: REST for actions, /ws for everything live. No external resources.
const state = { key: sessionStorage.getItem("pmdaemon-key"), processes: new Map(), history: new Map(),
  system: { cpu: [], mem: [], load: [] }, selected: null, ws: null, retry: 500, readOnly: false };
const $ = (id) => document.getElementById(id);
const HISTORY = 60;

async function api(method, path, body) {
  const headers = {};
  if (state.key) headers["Authorization"] = "Bearer " + state.key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const error = new Error(data && data.error ? data.error.message : "HTTP " + response.status);
    error.status = response.status;
    throw error;
  }
  return data;
}

async function start() {
  try {
    const access = await api("GET", "/api/access");
    state.readOnly = access.access === "read";
    document.body.classList.toggle("read-only", state.readOnly);
    $("access").textContent = state.readOnly ? "read-only key" : (state.key ? "key" : "local user");
    $("login").hidden = true;
    $("app").hidden = false;
    connect();
  } catch (error) {
    if (error.status === 401) {
      $("login").hidden = false;
      $("app").hidden = true;
      $("login-error").textContent = state.key ? "That key was refused." : "";
      $("key").focus();
    } else {
      $("connection").textContent = "cannot reach the daemon: " + error.message;
      setTimeout(start, reconnectDelay());
    }
  }
}

function reconnectDelay() {
  state.retry = Math.min(state.retry * 2, 10000);
  return state.retry;
}

async function connect() {
  let url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
  if (state.key) {
    try { url += "?ticket=" + encodeURIComponent((await api("POST", "/api/ws-ticket")).ticket); }
    catch (error) { setTimeout(start, reconnectDelay()); return; }
  }
  const ws = new WebSocket(url);
  state.ws = ws;
  ws.onopen = () => {
    state.retry = 500;
    $("connection").textContent = "live";
    if (state.selected) subscribe(state.selected);
  };
  ws.onmessage = (event) => receive(JSON.parse(event.data));
  ws.onclose = () => {
    $("connection").textContent = "reconnecting";
    state.ws = null;
    setTimeout(start, reconnectDelay());
  };
}

function send(message) { if (state.ws && state.ws.readyState === 1) state.ws.send(JSON.stringify(message)); }
function subscribe(name) { send({ type: "subscribe", channel: "logs", process: name }); }

function receive(message) {
  const data = message.data;
  if (message.type === "process_update") {
    data.seen = Date.now();   // a quiet process is not repeated each tick: its uptime runs on here
    state.processes.set(data.name, Object.assign(state.processes.get(data.name) || {}, data));
    const history = state.history.get(data.name) || { cpu: [], mem: [] };
    push(history.cpu, data.cpu); push(history.mem, data.memory);
    state.history.set(data.name, history);
    render();
  } else if (message.type === "system_update") {
    push(state.system.cpu, data.cpu); push(state.system.mem, data.memory.usage_percent); push(state.system.load, data.load.one);
    $("sys-cpu").textContent = data.cpu.toFixed(1) + "%";
    $("sys-mem").textContent = data.memory.usage_percent.toFixed(1) + "%";
    $("sys-load").textContent = [data.load.one, data.load.five, data.load.fifteen].join(" ");
    chart($("chart-cpu"), state.system.cpu, 100); chart($("chart-mem"), state.system.mem, 100); chart($("chart-load"), state.system.load);
    render();
  } else if (message.type === "health_update") {
    const entry = state.processes.get(data.process);
    if (entry) { entry.health = data.status; render(); }
  } else if (message.type === "process_event") {
    const item = document.createElement("li");
    item.textContent = data.timestamp + " " + data.process + " " + data.event +
      (data.reason ? ": " + data.reason : data.exit_code !== undefined ? " (code " + data.exit_code + ")" : "");
    $("events").prepend(item);
    while ($("events").children.length > 100) $("events").lastChild.remove();
    if (data.event === "deleted") { state.processes.delete(data.process); render(); }
  } else if (message.type === "log" && data.process === state.selected) {
    appendLog(data);
  }
}

function push(list, value) { list.push(value); if (list.length > HISTORY) list.shift(); }

function chart(canvas, values, top) {
  const context = canvas.getContext("2d");
  const width = canvas.width, height = canvas.height;
  context.clearRect(0, 0, width, height);
  if (!values.length) return;
  const max = top || Math.max(1, ...values);
  context.strokeStyle = "#0969da";
  context.beginPath();
  values.forEach((value, index) => {
    const x = width * index / Math.max(1, HISTORY - 1), y = height - 2 - (height - 4) * value / max;
    index ? context.lineTo(x, y) : context.moveTo(x, y);
  });
  context.stroke();
}

function human(bytes) {
  for (const [unit, size] of [["G", 1 << 30], ["M", 1 << 20], ["K", 1 << 10]]) if (bytes >= size) return (bytes / size).toFixed(1) + unit;
  return bytes + "B";
}

function duration(ms) {
  const s = Math.floor(ms / 1000);
  for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60]]) if (s >= size) return Math.floor(s / size) + unit;
  return s + "s";
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function button(parent, label, action) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", (event) => { event.stopPropagation(); action(); });
  parent.appendChild(b);
}

function render() {
  const body = $("processes");
  const rows = [...state.processes.values()].sort((a, b) => a.id - b.id);
  body.replaceChildren();
  for (const p of rows) {
    const row = document.createElement("tr");
    row.tabIndex = 0;
    if (p.name === state.selected) row.className = "selected";
    row.addEventListener("click", () => select(p.name));
    row.addEventListener("keydown", (event) => { if (event.key === "Enter") select(p.name); });
    cell(row, p.id); cell(row, p.name); cell(row, p.status, p.status); cell(row, p.pid || "-"); cell(row, p.port || "-");
    cell(row, p.cpu.toFixed(1) + "%"); cell(row, human(p.memory)); cell(row, duration(p.uptime + (p.status === "online" ? Date.now() - p.seen : 0))); cell(row, p.restarts);
    cell(row, p.health || "none", p.health);
    const spark = document.createElement("canvas");
    spark.width = 90; spark.height = 20; spark.style.width = "90px"; spark.style.height = "20px";
    cell(row, "").appendChild(spark);
    chart(spark, (state.history.get(p.name) || { cpu: [] }).cpu);
    const actions = cell(row, "", "acts");
    for (const verb of ["start", "stop", "restart", "reload"]) button(actions, verb, () => act("POST", "/api/processes/" + encodeURIComponent(p.name) + "/" + verb));
    button(actions, "scale", () => {
      const count = prompt("How many copies of " + p.name.replace(/-\d+$/, "") + "?", "2");
      if (count) act("PATCH", "/api/processes/" + encodeURIComponent(p.name.replace(/-\d+$/, "")), { instances: Number(count) });
    });
    button(actions, "delete", () => { if (confirm("Delete " + p.name + "? It is stopped and removed.")) act("DELETE", "/api/processes/" + encodeURIComponent(p.name)); });
    body.appendChild(row);
  }
}

async function act(method, path, body) {
  $("action-error").textContent = "";
  try { await api(method, path, body); } catch (error) { $("action-error").textContent = error.message; }
}

async function select(name) {
  if (state.selected) send({ type: "unsubscribe", channel: "logs", process: state.selected });
  state.selected = name;
  $("log-name").textContent = name;
  $("logs").textContent = "";
  render();
  subscribe(name);
  try {
    const data = await api("GET", "/api/logs/" + encodeURIComponent(name) + "?lines=100");
    data.logs.forEach(appendLog);
  } catch (error) { $("logs").textContent = error.message; }
}

function appendLog(entry) {
  const view = $("logs");
  const atEnd = view.scrollTop + view.clientHeight >= view.scrollHeight - 4;
  view.append(entry.timestamp + " " + entry.type + " " + entry.message + "\n");
  while (view.childNodes.length > 1000) view.firstChild.remove();
  if (atEnd) view.scrollTop = view.scrollHeight;
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = $("key").value;
  sessionStorage.setItem("pmdaemon-key", state.key);
  start();
});

$("create").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  const body = { name: form.get("name"), script: form.get("script") };
  if (form.get("args").trim()) body.args = form.get("args").trim().split(/\s+/);
  if (form.get("cwd").trim()) body.cwd = form.get("cwd").trim();
  if (form.get("port").trim()) body.port = form.get("port").trim();
  if (Number(form.get("instances")) > 1) body.instances = Number(form.get("instances"));
  const env = {};
  for (const line of form.get("env").split("\n")) { const at = line.indexOf("="); if (at > 0) env[line.slice(0, at).trim()] = line.slice(at + 1); }
  if (Object.keys(env).length) body.env = env;
  $("create-error").textContent = "";
  try { await api("POST", "/api/processes", body); event.target.reset(); }
  catch (error) { $("create-error").textContent = error.message; }
});

start();
'''

# Scripts and styles only from the page's own origin (no inline code at all), no framing.
DASHBOARD_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
                 "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


class StaticFile(NamedTuple):
    """A page or asset served with a strong ETag, so a browser revalidates instead of refetching."""
    body: bytes
    content_type: str
    etag: str

    @classmethod
    def of(cls, text: str, content_type: str) -> "StaticFile":
        body = text.encode("utf-8")
        return cls(body, content_type, '"%s"' % hashlib.sha256(body).hexdigest()[:32])


DASHBOARD_FILES = {"/": StaticFile.of(DASHBOARD_HTML, "text/html; charset=utf-8"),
                   "/dashboard.css": StaticFile.of(DASHBOARD_CSS, "text/css; charset=utf-8"),
                   "/dashboard.js": StaticFile.of(DASHBOARD_JS, "text/javascript; charset=utf-8")}


# -- the OpenAPI 3.1 document: from the route rows (Api.routes) and CONFIG_FIELDS ---------------

def _object(properties: Dict[str, Any], required: Tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required)}


def _ref(name: str) -> dict:
    return {"$ref": "#/components/schemas/" + name}


NULLABLE_INT = {"type": ["integer", "null"]}


def or_null(schema: dict) -> dict:
    """The schema of an optional setting: null too, which means "the default"."""
    schema = dict(schema)
    schema["type"] = (schema["type"] if isinstance(schema["type"], list) else [schema["type"]]) + ["null"]
    if "enum" in schema:
        schema["enum"] = schema["enum"] + [None]
    return schema


# What each setting takes (README 'Process settings'), from the one table of them.
CONFIG_SCHEMA = {name: field.schema if field.required else or_null(field.schema)
                 for name, field in CONFIG_FIELDS.items()}

OPENAPI_SCHEMAS = {
    "Error": _object({"success": {"const": False}, "error": _object(
        {"code": {"type": "string"}, "message": {"type": "string"}, "details": {}}, ("code", "message"))},
        ("success", "error")),
    "Message": _object({"success": {"const": True}, "message": {"type": "string"}}, ("success", "message")),
    "ProcessSummary": _object({"id": {"type": "integer"}, "name": {"type": "string"},
                               "status": {"enum": [state.value for state in ProcessState]},
                               "pid": NULLABLE_INT, "port": NULLABLE_INT, "cpu": {"type": "number"},
                               "memory": {"type": "integer"}, "uptime": {"type": "integer"},
                               "restarts": {"type": "integer"},
                               "health": {"enum": ["none", "unknown", "healthy", "unhealthy"]}},
                              ("id", "name", "status", "pid", "port", "cpu", "memory", "uptime", "restarts", "health")),
    "ProcessList": _object({"processes": {"type": "array", "items": _ref("ProcessSummary")},
                            "total": {"type": "integer"}}, ("processes", "total")),
    "ProcessDetails": {"allOf": [_ref("ProcessSummary"), _object({
        "config": _ref("ProcessConfig"), "instance": {"type": "integer"}, "started_at": {"type": ["string", "null"]},
        "last_exit": {"type": ["object", "null"]}, "error": {"type": ["string", "null"]},
        "next_restart_at": {"type": ["string", "null"]}, "log_files": {"type": "object"},
        "log_write_errors": {"type": "integer"}, "waiting_for": {"type": "array", "items": {"type": "string"}}})]},
    "ProcessGroup": _object({"name": {"type": "string"}, "instances": {"type": "integer"},
                             "processes": {"type": "array", "items": _ref("ProcessDetails")}}),
    "ProcessConfig": {"type": "object", "additionalProperties": False, "required": ["name", "script"],
                      "description": "Process settings; README 'Process settings' gives each default.",
                      "properties": CONFIG_SCHEMA},
    "ProcessPatch": {"type": "object", "additionalProperties": False, "description": "Any subset of ProcessConfig.",
                     "properties": CONFIG_SCHEMA},
    "Created": {"allOf": [_ref("Message"), _object({"process": _object({}), "processes": {"type": "array"}})]},
    "Updated": {"allOf": [_ref("Message"), _object({"applied": {"enum": ["unchanged", "saved", "scaled", "restarted"]},
                                                    "processes": {"type": "array", "items": _ref("ProcessSummary")}})]},
    "SignalBody": {"type": "object", "required": ["signal"], "additionalProperties": False,
                   "properties": {"signal": {"type": ["string", "integer"]}}},
    "StdinBody": {"type": "object", "required": ["data"], "additionalProperties": False,
                  "properties": {"data": {"type": "string", "maxLength": MAX_STDIN_WRITE}}},
    "RestartBody": {"type": "object", "additionalProperties": False, "properties": {
        "port": CONFIG_SCHEMA["port"], "instances": CONFIG_SCHEMA["instances"]}},
    "System": _object({"cpu": _object({"usage": {"type": "number"}, "cores": {"type": "integer"}}),
                       "memory": _object({}), "load": _object({}), "uptime": {"type": "integer"},
                       "timestamp": {"type": "string"}}, ("cpu", "memory", "load", "uptime", "timestamp")),
    "Logs": _object({"logs": {"type": "array", "items": _object(
        {"timestamp": {"type": "string"}, "type": {"enum": ["stdout", "stderr"]}, "message": {"type": "string"},
         "process": {"type": "string"}})}, "total_lines": {"type": "integer"}, "process": {"type": "string"}},
        ("logs", "total_lines", "process")),
    "Health": _object({"process": {"type": "string"}, "health": {"type": "object"}}),
    "Ticket": _object({"success": {"const": True}, "ticket": {"type": "string"}, "expires_in": {"type": "integer"}}),
    "Pm2List": {"type": "array", "items": _ref("Pm2Process")},
    "Pm2Process": _object({"pid": {"type": "integer"}, "name": {"type": "string"}, "pm_id": {"type": "integer"},
                           "monit": _object({"memory": {"type": "integer"}, "cpu": {"type": "number"}}),
                           "pm2_env": {"type": "object"}}),
}

WEBSOCKET_MESSAGES = {
    "server": {kind: "see README 'WebSocket API'" for kind in (
        "process_update", "system_update", "health_update", "process_event", "log", "dropped", "subscribed",
        "unsubscribed", "filtered", "pong", "error")},
    "client": {"subscribe": {"channel": "logs", "process": "NAME or *"},
               "unsubscribe": {"channel": "logs", "process": "NAME or *"},
               "filter": {"types": "array or null", "processes": "array or null"}, "ping": {}},
}


def openapi_document(routes: List[Any]) -> dict:
    """The OpenAPI 3.1 description of every route in the table, from each row's Operation."""
    paths: Dict[str, dict] = {}
    errors = {"4XX": {"description": "the spec's error body",
                      "content": {"application/json": {"schema": _ref("Error")}}}}
    for route in routes:
        doc = route.doc
        operation = {"summary": doc.summary, "responses": {str(doc.status): {"description": doc.summary}}}
        if doc.response:
            operation["responses"][str(doc.status)]["content"] = {"application/json": {"schema": _ref(doc.response)}}
        for code in doc.errors:
            operation["responses"][str(code)] = {"description": REASONS.get(code, "error"),
                                                 "content": errors["4XX"]["content"]}
        operation["responses"].update(errors)
        if doc.body:
            operation["requestBody"] = {"required": doc.body_required,
                                        "content": {"application/json": {"schema": _ref(doc.body)}}}
        if "{key}" in route.template:
            operation["parameters"] = [{"name": "key", "in": "path", "required": True,
                                        "description": "process name, group base name, or id",
                                        "schema": {"type": "string"}}]
        operation.update(doc.extensions or {})
        paths.setdefault(route.template, {})[route.method.lower()] = operation
    return {"openapi": "3.1.0",
            "info": {"title": "pmdaemon.py API", "version": __version__,
                     "description": "The PMDaemon Web API as pmdaemon.py serves it; see README.md."},
            "components": {"schemas": OPENAPI_SCHEMAS, "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}},
            "security": [{}, {"bearer": []}, {"apiKey": []}],
            "paths": paths}


def pm2_entry(runner: ProcessRunner, now: float, wall: float) -> dict:
    """A process as `pm2 jlist` shows it, for tools that speak PM2 (never its env)."""
    run = runner.run
    started = run.started_wall if run is not None and run.started_wall else None
    status = {"starting": "launching", "restarting": "waiting restart"}.get(runner.state.value, runner.state.value)
    return {"pid": runner.pid or 0, "name": runner.name, "pm_id": runner.id,
            "monit": {"memory": runner.memory, "cpu": runner.cpu},
            "pm2_env": {"name": runner.name, "pm_id": runner.id, "status": status,
                        "pm_uptime": int((started or wall) * 1000), "restart_time": runner.restarts,
                        "unstable_restarts": runner.unstable_restarts, "exec_mode": "fork_mode",
                        "instances": runner.config.instances, "instance_var": "NODE_APP_INSTANCE",
                        "NODE_APP_INSTANCE": runner.instance, "pm_exec_path": runner.config.script,
                        "pm_cwd": runner.config.cwd, "args": runner.config.args,
                        "exec_interpreter": "none", "autorestart": runner.config.autorestart,
                        "max_memory_restart": runner.config.max_memory_restart,
                        "pm_out_log_path": runner.logs.files["stdout"].path,
                        "pm_err_log_path": runner.logs.files["stderr"].path,
                        "port": runner.port, "health": runner.health.status,
                        "uptime": runner.uptime_ms(now)}}


# -- Prometheus metrics (text exposition format 0.0.4) ------------------------------------------

@record
class ServerStats:
    """What the server glue counts for /metrics."""
    requests: Dict[int, int] = record_field(dict)     # by status code
    connections: int = 0
    ws_clients: int = 0
    ws_dropped: int = 0

    def answered(self, status: int) -> None:
        self.requests[status] = self.requests.get(status, 0) + 1


def metric_labels(labels: Dict[str, Any]) -> str:
    """{a="x",b="y"} with values escaped as the exposition format wants (\\, \", \n)."""
    if not labels:
        return ""
    return "{%s}" % ",".join('%s="%s"' % (key, str(value).replace("\\", "\\\\").replace('"', '\\"')
                                         .replace("\n", "\\n")) for key, value in labels.items())


def metric_value(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class MetricsText:
    """Families in order, each with its HELP and TYPE once, then its samples."""

    def __init__(self):
        self.lines: List[str] = []

    def family(self, name: str, kind: str, text: str, samples: List[Tuple[Dict[str, Any], float]]) -> None:
        self.lines += ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind)]
        self.lines += ["%s%s %s" % (name, metric_labels(labels), metric_value(value)) for labels, value in samples]

    def render(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode("utf-8")


def daemon_usage(proc_root: str = "/proc") -> Tuple[int, int]:
    """(resident bytes, open descriptors) of this process; zeros where /proc says nothing."""
    rss = fds = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open(os.path.join(proc_root, "self", "statm")) as handle:
            rss = int(handle.read().split()[1]) * PAGE_SIZE
    with contextlib.suppress(OSError):
        fds = len(os.listdir(os.path.join(proc_root, "self", "fd")))
    return rss, fds


def prometheus_metrics(runners: List[ProcessRunner], system: SystemMetrics, stats: ServerStats,
                       now: float) -> bytes:
    """GET /metrics: every process, the host and the daemon itself."""
    out = MetricsText()

    def each(value: Callable[[ProcessRunner], Any]) -> List[Tuple[Dict[str, Any], float]]:
        return [({"name": r.name, "id": r.id, "instance": r.instance}, value(r)) for r in runners
                if value(r) is not None]
    out.family("pmdaemon_process_status", "gauge", "1 for the status the process is in, else 0.",
               [({"name": r.name, "id": r.id, "instance": r.instance, "status": state.value},
                 int(r.state is state)) for r in runners for state in ProcessState])
    out.family("pmdaemon_process_cpu_percent", "gauge", "CPU of the process tree, % of one core.", each(lambda r: r.cpu))
    out.family("pmdaemon_process_memory_bytes", "gauge", "Resident memory of the process tree.", each(lambda r: r.memory))
    out.family("pmdaemon_process_uptime_seconds", "gauge", "Seconds since the current run started.",
               each(lambda r: r.uptime_ms(now) / 1000))
    out.family("pmdaemon_process_restarts_total", "counter", "Restarts, automatic and asked for.",
               each(lambda r: r.restarts))
    out.family("pmdaemon_process_unstable_restarts", "gauge", "Exits before min_uptime in a row.",
               each(lambda r: r.unstable_restarts))
    out.family("pmdaemon_process_health_status", "gauge", "1 for the health the process is in, else 0.",
               [({"name": r.name, "id": r.id, "instance": r.instance, "health": health},
                 int(r.health.status == health)) for r in runners
                for health in ("none", "unknown", "healthy", "unhealthy")])
    out.family("pmdaemon_process_health_check_duration_seconds", "gauge", "How long the last check took.",
               each(lambda r: r.health.last_duration))
    out.family("pmdaemon_process_last_exit_code", "gauge", "Exit code of the last run (absent when none "
               "or killed by a signal).", each(lambda r: (r.last_exit or {}).get("code")))
    out.family("pmdaemon_process_log_bytes_written_total", "counter", "Bytes written to the log files.",
               each(lambda r: r.logs.bytes_written))
    out.family("pmdaemon_process_log_write_errors_total", "counter", "Log writes that failed (lines dropped).",
               each(lambda r: r.logs.write_errors))
    out.family("pmdaemon_system_cpu_percent", "gauge", "Host CPU busy over the last sample.", [({}, system.cpu_usage)])
    out.family("pmdaemon_system_memory_total_bytes", "gauge", "Host memory.", [({}, system.memory_total)])
    out.family("pmdaemon_system_memory_available_bytes", "gauge", "Host memory available.",
               [({}, system.memory_available)])
    out.family("pmdaemon_system_load", "gauge", "Host load average.",
               [({"period": period}, value) for period, value in zip(("1m", "5m", "15m"), system.load)])
    rss, fds = daemon_usage()
    out.family("pmdaemon_daemon_resident_memory_bytes", "gauge", "The daemon's own resident memory.", [({}, rss)])
    out.family("pmdaemon_daemon_open_fds", "gauge", "The daemon's open file descriptors.", [({}, fds)])
    out.family("pmdaemon_http_requests_total", "counter", "HTTP requests answered, by status code.",
               [({"code": code}, count) for code, count in sorted(stats.requests.items())])
    out.family("pmdaemon_http_connections", "gauge", "Open connections (HTTP and WebSocket).",
               [({}, stats.connections)])
    out.family("pmdaemon_websocket_clients", "gauge", "WebSocket clients.", [({}, stats.ws_clients)])
    out.family("pmdaemon_websocket_dropped_messages_total", "counter", "Updates and log lines dropped for "
               "WebSocket clients that read too slowly.", [({}, stats.ws_dropped)])
    return out.render()


# -- HTTP log following --------------------------------------------------------------------------

class LogFollower:
    """One GET /api/logs/{key}?follow=true stream: a LogHub subscriber with a bounded queue.
    A follower that cannot keep up is ended rather than buffered without bound."""

    def __init__(self, hub: LogHub, names: List[str], log_type: str, label_lines: bool):
        self.hub, self.names, self.log_type, self.label_lines = hub, names, log_type, label_lines
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=FOLLOW_QUEUE_LINES)
        hub.subscribe(self, names)              # before the backlog is read: no line falls between

    def on_log(self, line: LogLine) -> None:
        if self.log_type != "all" and line.entry.type != self.log_type:
            return
        if self.queue.full():
            self.on_log_end(None)
        else:
            self.queue.put_nowait(line)

    def on_log_end(self, name: Optional[str]) -> None:
        self.hub.unsubscribe(self, self.names)
        while self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait(None)

    def encode(self, item: dict, process: str) -> bytes:
        if self.label_lines:
            item["process"] = process
        return json_bytes(item) + b"\n"

    async def stream(self, backlog: List[bytes]):
        """NDJSON: the backlog, then each new line, until the process is deleted or we stop."""
        try:
            for chunk in backlog:
                yield chunk
            while True:
                line = await self.queue.get()
                if line is None:
                    return
                yield self.encode(line.entry.to_api(), line.process)
        finally:
            self.hub.unsubscribe(self, self.names)


# -- the REST API ---------------------------------------------------------------------------------

class AnswerPlan:
    """How to answer one learned head: the snapshot that gives the body, and everything else
    the full path put in its response (headers, CORS, keep-alive, HEAD). The bytes are kept
    until the snapshot or the Date second changes."""
    __slots__ = ("snapshot", "content_type", "cache", "headers", "http10", "head_only", "_body", "_date", "_bytes")

    def __init__(self, snapshot: Callable[[], bytes], response: Response, http10: bool, head_only: bool):
        self.snapshot = snapshot
        self.content_type, self.cache = response.content_type, response.cache
        self.headers = tuple(response.headers)
        self.http10, self.head_only = http10, head_only
        self._body = self._date = None
        self._bytes = b""

    def render(self, date: bytes) -> bytes:
        body = self.snapshot()
        if body is not self._body or date is not self._date:
            response = Response(200, body, self.content_type, list(self.headers), cache=self.cache)
            rendered = serialize_response(response, date, True, self.http10, self.head_only)
            if len(rendered) > PLAN_KEEP_BYTES:
                return rendered             # a big list: joined anew rather than kept per head
            self._bytes, self._body, self._date = rendered, body, date
        return self._bytes


class RepeatedAnswers:
    """Answers a header block seen before, byte for byte as the full path would, without
    parsing it again.

    Pollers (scripts, dashboards, load tools, Prometheus) send the very same head over and
    over. Once the full parser and admission have accepted a keep-alive GET or HEAD of a
    snapshot route (no body, no query, no ticket) and answered it 200, its exact bytes become
    a key: the verdict of parser and admission depends only on those bytes and on settings
    fixed at start (keys, hosts, origins; the peer is checked per connection), so the next
    identical head is answered from the same snapshot by the same serializer. Anything else
    (another head, pipelined requests, a head split over reads) takes the full path. Bounded:
    `limit` heads of at most `max_head` bytes, oldest forgotten first, each keeping at most
    PLAN_KEEP_BYTES of rendered answer."""
    __slots__ = ("plans", "limit", "max_head")

    def __init__(self, limit: int = 32, max_head: int = 2048):
        self.plans: Dict[bytes, AnswerPlan] = {}
        self.limit, self.max_head = limit, max_head

    def learn(self, raw: bytes, request: Request, response: Response, keep_alive: bool) -> None:
        """Remember `raw` (the whole head, as read) if its answer is a pure function of it."""
        route = request.route
        if (route is None or route.snapshot is None or route.ticket_ok or not keep_alive
                or len(raw) > self.max_head or request.query or request.body or request.chunked
                or request.method not in ("GET", "HEAD") or response.status != 200
                or response.stream is not None or response.close or raw in self.plans):
            return
        if len(self.plans) >= self.limit:
            del self.plans[next(iter(self.plans))]
        self.plans[raw] = AnswerPlan(route.snapshot, response, request.version == "HTTP/1.0",
                                     request.method == "HEAD")

    def answer(self, raw: bytes, date: bytes) -> Optional[bytes]:
        plan = self.plans.get(raw)
        return plan.render(date) if plan is not None else None


class Api:
    """The REST API of the spec plus start/stop, ws-ticket and the /ws handshake.

    admit() decides from the head alone (Host, Origin, key, route, method, media type), before
    a body is read; handle() runs the handler; every error becomes a response in error_response."""

    def __init__(self, supervisor: Supervisor, policy: AccessPolicy, tickets: Optional[TicketBook] = None):
        self.supervisor = supervisor
        self.policy = policy
        self.tickets = tickets or TicketBook()
        self._list_cache: Tuple[int, bytes] = (-1, b"")
        self._system_cache: Tuple[Any, bytes] = (None, b"")
        self._route_cache = BoundedCache()
        self._log_readers: Optional[asyncio.Semaphore] = None
        public, read, acts, ticket = Access.PUBLIC, Access.READ, Access.ACTS, Access.TICKET
        self.routes = [route(*row) for row in (
            # method, template, handler, who may call it, its OpenAPI Operation (summary, success
            # status, response schema, ...) and, for a GET that answers a snapshot, the snapshot
            ("GET", "/api/processes", self.list_processes, read,
             Operation("List processes", 200, "ProcessList"), self.process_list_body),
            ("POST", "/api/processes", self.create_process, acts,
             Operation("Create and start a process (or a group)", 201, "Created", "ProcessConfig",
                       errors=(400, 409, 415, 507))),
            ("GET", "/api/processes/{key}", self.get_process, read,
             Operation("One process, or a group by its base name", 200, "ProcessDetails", errors=(404,))),
            ("DELETE", "/api/processes/{key}", self.delete_process, acts,
             Operation("Stop and remove", 200, "Message", errors=(404,))),
            ("PATCH", "/api/processes/{key}", self.update_process, acts,
             Operation("Change settings in place", 200, "Updated", "ProcessPatch", errors=(400, 404, 409, 415, 422))),
            ("POST", "/api/processes/{key}/start", self.start_process, acts,
             Operation("Start", 200, "Message", errors=(404, 409, 422))),
            ("POST", "/api/processes/{key}/stop", self.stop_process, acts,
             Operation("Stop, keeping the entry", 200, "Message", errors=(404,))),
            ("POST", "/api/processes/{key}/restart", self.restart_process, acts,
             Operation("Restart; optionally a new port or instances", 200, "Message", "RestartBody",
                       body_required=False, errors=(400, 404, 409, 422))),
            ("POST", "/api/processes/{key}/reload", self.reload_process, acts,
             Operation("Rolling restart, one copy at a time", 200, "Message", errors=(404, 409, 422))),
            ("POST", "/api/processes/{key}/signal", self.signal_process, acts,
             Operation("Send a signal to the main process", 200, "Message", "SignalBody", errors=(400, 404, 409))),
            ("POST", "/api/processes/{key}/stdin", self.write_stdin, acts,
             Operation("Write to the process's stdin (created with stdin: true)", 200, "Message", "StdinBody",
                       errors=(400, 404, 409))),
            ("GET", "/api/processes/{key}/health", self.get_health, read,
             Operation("Health check state", 200, "Health", errors=(404,))),
            ("GET", "/api/system", self.get_system, read,
             Operation("Host metrics", 200, "System"), self.system_body),
            ("GET", "/api/logs/{key}", self.get_logs, read,
             Operation("Last log lines; ?follow=true streams NDJSON", 200, "Logs", errors=(400, 404))),
            ("DELETE", "/api/logs/{key}", self.flush_logs, acts,
             Operation("Empty the logs", 200, "Message", errors=(404,))),
            ("POST", "/api/ws-ticket", self.create_ticket, read,      # a read-only key may watch too
             Operation("A single-use ticket for a browser's WebSocket", 201, "Ticket", errors=(503,))),
            ("GET", "/ws", self.open_websocket, ticket,
             Operation("WebSocket (RFC 6455): see x-websocket", 101, errors=(400, 426, 503),
                       extensions={"x-websocket": WEBSOCKET_MESSAGES})),
            ("GET", "/metrics", self.get_metrics, read, Operation("Prometheus text exposition 0.0.4", 200)),
            ("GET", "/api/pm2/jlist", self.get_pm2_jlist, read,
             Operation("Processes in the shape of pm2 jlist", 200, "Pm2List")),
            ("GET", "/api/pm2", self.get_pm2_web, read,
             Operation("The old pm2 web shape: system_info, monit, processes", 200)),
            ("GET", "/api/openapi.json", self.get_openapi, read, Operation("This document", 200)),
            ("GET", "/api/access", self.get_access, read,
             Operation("What the caller may do: full, or read (a read-only key)", 200)),
            ("GET", "/", self.get_static, public, Operation("The dashboard (HTML)", 200)),
            ("GET", "/dashboard.css", self.get_static, public, Operation("The dashboard's stylesheet", 200)),
            ("GET", "/dashboard.js", self.get_static, public, Operation("The dashboard's script", 200)),
        )]
        self.server_stats = ServerStats()     # kept by the server glue, shown by /metrics

    # -- admission and dispatch -----------------------------------------------------------------

    def cors(self, request: Optional[Request]) -> List[Tuple[str, str]]:
        if request is None:
            return []
        return self.policy.cors_headers(request, preflight=request.method == "OPTIONS")

    def error_response(self, error: BaseException, request: Optional[Request] = None) -> Response:
        """Any error, for any caller (REST, framing, handshake, limits), with CORS when known."""
        return error_response(error, self.cors(request))

    def admit(self, request: Request) -> Optional[Response]:
        """Decide from the head: raise to refuse; a Response when the head alone is answered
        (OPTIONS); None when the handler may run once the body is in."""
        self.policy.check_host(request)
        self.policy.check_origin(request)
        method = "GET" if request.method == "HEAD" else request.method
        route, params, allowed = self.find_route(method, request.path)
        if request.method == "OPTIONS":
            if request.path != "*" and not allowed:
                raise self.not_found(request)
            return Response(204, headers=[("Allow", ", ".join(allowed + ["OPTIONS"]) if allowed
                                           else "GET, HEAD, POST, PATCH, DELETE, OPTIONS")] + self.cors(request))
        access = "full" if route is not None and route.public else self.policy.check_key(
            request, self._ticket_redeemed(request) if route is not None and route.ticket_ok else None)
        if route is None:
            if allowed:
                raise HttpError(405, "METHOD_NOT_ALLOWED", "method %s is not allowed on %s"
                                % (request.method, request.path), {"allowed_methods": allowed + ["OPTIONS"]},
                                headers=(("Allow", ", ".join(allowed + ["OPTIONS"])),))
            raise self.not_found(request)
        if access == "read" and route.acts:
            raise HttpError(403, "FORBIDDEN_READ_ONLY", "this key can only read: %s %s needs the API key"
                            % (request.method, request.path[:200]))
        if request.chunked or request.content_length:
            content_type = (request.header("content-type") or "").split(";")[0].strip(" \t").lower()
            if content_type != "application/json":
                raise HttpError(415, "UNSUPPORTED_MEDIA_TYPE", "request body must be sent with "
                                "'Content-Type: application/json', got %r" % (request.header("content-type") or "")[:80])
        request.route, request.params = route, params
        request.access = access
        return None

    def _ticket_redeemed(self, request: Request) -> Optional[str]:
        ticket = parse_query(request.query, ("ticket",)).get("ticket")
        return self.tickets.redeem(ticket) if ticket is not None else None

    async def handle(self, request: Request) -> Response:
        """Answer a request; every error, expected or not, becomes the spec's error body."""
        try:
            if request.route is None:
                early = self.admit(request)
                if early is not None:
                    return early
            response = await request.route.handler(request, **request.params)
        except Exception as error:
            if not isinstance(error, PMDaemonError):
                log.error("internal error on %s %s", request.method, log_safe(request.path), exc_info=error)
                error = INTERNAL_ERROR
            return self.error_response(error, request)
        response.headers.extend(self.cors(request))
        return response

    def find_route(self, method: str, path: str) -> Tuple[Optional[Route], Dict[str, str], List[str]]:
        """The route for (method, path), its parameters, and every method the path allows."""
        found = self._route_cache.get((method, path))
        if found is None:
            found = self._route_cache.remember((method, path), self._search_routes(method, path))
        return found

    def _search_routes(self, method: str, path: str) -> Tuple[Optional[Route], Dict[str, str], List[str]]:
        allowed, chosen, params = [], None, {}
        for route in self.routes:
            found = route.pattern.match(path)
            if found:
                allowed.append(route.method)
                if route.method == method and chosen is None:
                    chosen, params = route, found.groupdict()
        if "GET" in allowed:
            allowed.append("HEAD")
        return chosen, params, allowed

    def not_found(self, request: Request) -> HttpError:
        return HttpError(404, "NOT_FOUND", "no such endpoint: %s" % request.path[:200])

    # -- handlers --------------------------------------------------------------------------------

    async def list_processes(self, request: Request) -> Response:
        if request.query:
            return self.filtered_list(parse_query(request.query, ("status", "namespace", "name")))
        return Response(200, self.process_list_body())

    def process_list_body(self) -> bytes:
        """The unfiltered list, serialised once per announcement (the same bytes object until
        something changes: RepeatedAnswers relies on that identity)."""
        generation = self.supervisor.generation
        if self._list_cache[0] != generation:
            now = self.supervisor.clock()
            entries = [process_summary(runner, now) for runner in self.supervisor.registry.runners()]
            self._list_cache = (generation, json_bytes({"processes": entries, "total": len(entries)}))
        return self._list_cache[1]

    def filtered_list(self, params: Dict[str, str]) -> Response:
        """?status=online&namespace=api&name=web-* (shell-style wildcards in name)."""
        status = params.get("status")
        if status is not None and status not in {state.value for state in ProcessState}:
            raise invalid_field("status", "query parameter 'status' must be one of %s, got %r"
                                % (", ".join(state.value for state in ProcessState), status[:40]))
        import fnmatch
        now = self.supervisor.clock()
        entries = [process_summary(runner, now) for runner in self.supervisor.registry.runners()
                   if (status is None or runner.state.value == status)
                   and params.get("namespace", runner.config.namespace) == runner.config.namespace
                   and fnmatch.fnmatchcase(runner.name, params.get("name", "*"))]
        return json_response(200, {"processes": entries, "total": len(entries)})

    async def get_process(self, request: Request, key: str) -> Response:
        members = self.supervisor.resolve(key)
        now = self.supervisor.clock()
        full = request.access == "full"
        if len(members) == 1:
            return json_response(200, process_details(members[0], now, full))
        return json_response(200, {"name": key, "instances": len(members),
                                   "processes": [process_details(runner, now, full) for runner in members]})

    async def create_process(self, request: Request) -> Response:
        config = ProcessConfig.from_dict(parse_json_body(request))
        members = await self.supervisor.add(config)
        first = members[0]
        brief = [{"id": runner.id, "name": runner.name, "status": runner.state.value, "pid": runner.pid,
                  "port": runner.port} for runner in members]
        failed = [runner for runner in members if runner.state is ProcessState.ERRORED]
        text = ("Process %r created (not started: autostart is false)" % config.name if not config.autostart
                else "Process %r started successfully" % config.name if not failed else
                "Process %r created but failed to start: %s" % (config.name, failed[0].error))
        body = message(text, process=brief[0])
        if failed:
            body["process"]["error"] = first.error
        if len(members) > 1:
            body["processes"] = brief
        return json_response(201, body)

    async def update_process(self, request: Request, key: str) -> Response:
        members, applied = await self.supervisor.update(key, parse_json_body(request))
        name = group_label(members)
        text = {"unchanged": "Process %r is unchanged", "saved": "Process %r updated (not running)",
                "scaled": "Process %r scaled", "restarted": "Process %r updated and restarted"}[applied] % name
        now = self.supervisor.clock()
        return json_response(200, message(text, applied=applied,
                                          processes=[process_summary(runner, now) for runner in members]))

    async def flush_logs(self, request: Request, key: str) -> Response:
        members = self.supervisor.resolve(key)
        for runner in members:
            runner.logs.flush()
        return json_response(200, message("Logs of %r flushed" % group_label(members)))

    async def delete_process(self, request: Request, key: str) -> Response:
        members = await self.supervisor.delete(key)
        return json_response(200, message("Process %r stopped successfully" % group_label(members)))

    async def stop_process(self, request: Request, key: str) -> Response:
        members = self.supervisor.resolve(key)
        name = group_label(members)
        if await self.supervisor.stop(members):
            return json_response(200, message("Process %r stopped successfully" % name))
        return json_response(200, message("Process %r was not running" % name))

    async def start_process(self, request: Request, key: str) -> Response:
        members = self.supervisor.resolve(key)
        await self.supervisor.start(members)
        return json_response(200, message("Process %r started successfully" % group_label(members)))

    async def restart_process(self, request: Request, key: str) -> Response:
        body = parse_json_body(request, required=False) or {}
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object, got %s" % _json_type(body))
        for field in body:
            if field not in ("port", "instances"):
                raise invalid_field(field, "unknown field %r (restart accepts 'port' and 'instances')" % field[:80])
        port = parse_port_value("port", body["port"]) if body.get("port") is not None else None
        instances = (CONFIG_FIELDS["instances"].parse(body["instances"])
                     if body.get("instances") is not None else None)
        members = await self.supervisor.restart(key, port, instances)
        return json_response(200, message("Process %r restarted successfully" % group_label(members)))

    async def reload_process(self, request: Request, key: str) -> Response:
        if parse_json_body(request, required=False) not in (None, {}):
            raise BadRequest("reload takes no body; use restart to change port or instances")
        members = await self.supervisor.reload(key)
        return json_response(200, message("Process %r reloaded successfully" % group_label(members)))

    async def signal_process(self, request: Request, key: str) -> Response:
        body = parse_json_body(request)
        if not isinstance(body, dict) or set(body) != {"signal"}:
            raise BadRequest('the body is {"signal": "SIGUSR1"} (any signal name, or a number)')
        signum = parse_any_signal(body["signal"])
        members = self.supervisor.resolve(key)
        if not any([runner.send_signal(signum) for runner in members if runner.run is not None]):
            raise NotRunning("Process %r is not running" % group_label(members))
        return json_response(200, message("Signal %s sent to %r" % (signal.Signals(signum).name, group_label(members))))

    async def write_stdin(self, request: Request, key: str) -> Response:
        body = parse_json_body(request)
        if not isinstance(body, dict) or set(body) != {"data"} or not isinstance(body["data"], str):
            raise BadRequest('the body is {"data": "text to write"}')
        data = body["data"].encode("utf-8")
        if len(data) > MAX_STDIN_WRITE:
            raise invalid_field("data", "at most %d bytes at a time" % MAX_STDIN_WRITE)
        members = self.supervisor.resolve(key)
        for runner in members:
            await runner.write_stdin(data)
        return json_response(200, message("%d bytes written to the stdin of %r" % (len(data), group_label(members))))

    async def get_health(self, request: Request, key: str) -> Response:
        members = self.supervisor.resolve(key)
        full = request.access == "full"
        if len(members) == 1:
            return json_response(200, {"process": members[0].name, "health": health_body(members[0], full)})
        return json_response(200, {"process": key, "instances": [
            {"process": runner.name, "health": health_body(runner, full)} for runner in members]})

    async def get_system(self, request: Request) -> Response:
        return Response(200, self.system_body())

    def system_body(self) -> bytes:
        system = self.supervisor.system
        if self._system_cache[0] is not system:
            self._system_cache = (system, json_bytes(system.to_api()))
        return self._system_cache[1]

    async def get_logs(self, request: Request, key: str) -> Response:
        params = parse_query(request.query, ("lines", "type", "follow"))
        lines_text = params.get("lines", "20")
        if not is_ascii_digits(lines_text) or len(lines_text) > 6 \
                or int(lines_text) > MAX_LOG_REQUEST_LINES:
            raise invalid_field("lines", "query parameter 'lines' must be an integer from 0 to %d, got %r"
                                % (MAX_LOG_REQUEST_LINES, lines_text[:40]))
        log_type = params.get("type", "all")
        if log_type not in ("all",) + LOG_TYPES:
            raise invalid_field("type", "query parameter 'type' must be all, stdout or stderr, got %r"
                                % log_type[:40])
        follow = params.get("follow", "false").lower()
        if follow not in ("true", "false", "1", "0"):
            raise invalid_field("follow", "query parameter 'follow' must be true or false, got %r" % follow[:40])
        members = self.supervisor.resolve(key)
        count = int(lines_text)
        if follow in ("true", "1"):
            follower = LogFollower(self.supervisor.hub, [runner.name for runner in members], log_type,
                                   len(members) > 1)
            entries = await self.read_logs_off_loop(members, count, log_type)
            backlog = [json_bytes(item) + b"\n" for item in entries]
            return Response(200, content_type="application/x-ndjson", stream=follower.stream(backlog))
        entries = await self.read_logs_off_loop(members, count, log_type)
        return json_response(200, {"logs": entries, "total_lines": len(entries), "process": group_label(members)})

    async def read_logs_off_loop(self, members: List[ProcessRunner], count: int, log_type: str) -> List[dict]:
        """Files are read in a worker thread, a few at a time: a large read never stalls the
        event loop, so every other request and every child's pipe keep being served."""
        if self._log_readers is None:
            self._log_readers = asyncio.Semaphore(LOG_READERS)
        async with self._log_readers:
            return await asyncio.get_event_loop().run_in_executor(None, self.read_logs, members, count, log_type)

    def read_logs(self, members: List[ProcessRunner], count: int, log_type: str) -> List[dict]:
        merged = []
        for runner in members:
            for entry in runner.logs.tail(count, log_type):
                item = entry.to_api()
                if len(members) > 1:
                    item["process"] = runner.name
                merged.append(item)
        if len(members) > 1:
            merged.sort(key=lambda item: item["timestamp"])
        return merged[-count:] if count else []

    def pm2_processes(self) -> List[dict]:
        now, wall = self.supervisor.clock(), self.supervisor.wall()
        return [pm2_entry(runner, now, wall) for runner in self.supervisor.registry.runners()]

    async def get_pm2_jlist(self, request: Request) -> Response:
        return json_response(200, self.pm2_processes())

    async def get_pm2_web(self, request: Request) -> Response:
        """The shape of the old `pm2 web` (HttpInterface): system_info, monit, processes."""
        system = self.supervisor.system
        return json_response(200, {
            "system_info": {"hostname": socket.gethostname(), "uptime": system.uptime},
            "monit": {"loadavg": list(system.load), "total_mem": system.memory_total,
                      "free_mem": system.memory_available, "cpu": [{"usage": system.cpu_usage}] * system.cores,
                      "interfaces": {}},
            "processes": self.pm2_processes()})

    async def get_static(self, request: Request) -> Response:
        """The dashboard's files: HEAD, ETag and If-None-Match (304), the page under a strict CSP."""
        static = DASHBOARD_FILES[request.path]
        headers = [("ETag", static.etag)]
        if request.path == "/":
            headers.append(("Content-Security-Policy", DASHBOARD_CSP))
        if static.etag in [tag.strip() for tag in (request.header("if-none-match") or "").split(",")]:
            return Response(304, headers=headers, cache="no-cache")
        return Response(200, static.body, content_type=static.content_type, headers=headers, cache="no-cache")

    async def get_access(self, request: Request) -> Response:
        """What the caller may do: "full", or "read" with a read-only key (the dashboard hides
        the buttons it cannot use)."""
        return json_response(200, {"access": request.access, "key": self.policy.key_digest is not None})

    async def get_openapi(self, request: Request) -> Response:
        return json_response(200, openapi_document(self.routes))

    async def get_metrics(self, request: Request) -> Response:
        body = prometheus_metrics(self.supervisor.registry.runners(), self.supervisor.system,
                                  self.server_stats, self.supervisor.clock())
        return Response(200, body, content_type="text/plain; version=0.0.4; charset=utf-8")

    async def create_ticket(self, request: Request) -> Response:
        return json_response(201, {"success": True, "ticket": self.tickets.issue(request.holder, request.access),
                                   "expires_in": int(self.tickets.ttl)})

    async def open_websocket(self, request: Request) -> Response:
        """GET /ws: a valid handshake is answered 101 by the server glue, which runs the session."""
        return Response(101, headers=handshake_headers(check_handshake(request)))


# ==============================================================================================
# 10. Server glue
#     The only code that touches sockets. HttpServer accepts and hands each connection to an
#     HttpConnection, which runs the keep-alive loop with absolute per-phase deadlines and
#     sends every byte through its send(); WsSession runs one WebSocket; Broadcaster turns
#     supervisor events into WebSocket messages encoded once for all clients. Daemon wires it
#     all and handles signals.
# ==============================================================================================

# -- who opened a connection: the kernel's answer, never the client's ---------------------------

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
TCP_ESTABLISHED = 1
TCP_STATES_ALL = 0xFFFFFFFF
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
INET_DIAG_MSG_STATE_OFFSET = 16 + 1     # nlmsghdr, then inet_diag_msg: family, state, ...
INET_DIAG_MSG_UID_OFFSET = 16 + 64      # ... idiag_uid, then idiag_inode


class SocketEntry(NamedTuple):
    """One socket as the kernel's table lists it."""
    state: int
    uid: int
    inode: int


def trusted_owner(entry: Optional[SocketEntry]) -> Optional[int]:
    """The uid of a live, connected socket; None for anything else. A client that has closed
    leaves a remnant (FIN_WAIT2/TIME_WAIT, no inode) that the kernel lists with uid 0: taking
    its word would let anyone who connects, sends and closes at once pass for root."""
    if entry is None or entry.state != TCP_ESTABLISHED or entry.inode == 0:
        return None
    return entry.uid


def _raw_address(family: int, host: str) -> bytes:
    return socket.inet_pton(family, host.split("%")[0]).ljust(16, b"\0")


def sock_diag_request(family: int, local: Tuple, remote: Tuple, sequence: int = 1) -> bytes:
    """A SOCK_DIAG_BY_FAMILY request for the one TCP socket whose local end is `local` and
    remote end is `remote` (the client's own socket: local = the client's address)."""
    sockid = (struct.pack("!HH", local[1], remote[1]) + _raw_address(family, local[0])
              + _raw_address(family, remote[0]) + struct.pack("=III", 0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE))
    body = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, TCP_STATES_ALL) + sockid
    return struct.pack("=IHHII", 16 + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, sequence, 0) + body


def sock_diag_entry(reply: bytes) -> Optional[SocketEntry]:
    """The socket in a sock_diag answer; None for an error or an empty answer."""
    if len(reply) < INET_DIAG_MSG_UID_OFFSET + 8:
        return None
    length, kind = struct.unpack_from("=IH", reply)
    if kind != SOCK_DIAG_BY_FAMILY or length > len(reply):
        return None
    uid, inode = struct.unpack_from("=II", reply, INET_DIAG_MSG_UID_OFFSET)
    return SocketEntry(reply[INET_DIAG_MSG_STATE_OFFSET], uid, inode)


def proc_net_address(family: int, host: str, port: int) -> str:
    """An address as /proc/net/tcp{,6} writes it: 32-bit words in host order, then the port."""
    raw = socket.inet_pton(family, host.split("%")[0])
    words = struct.unpack("=%dI" % (len(raw) // 4), raw)
    return "%s:%04X" % ("".join("%08X" % word for word in words), port)


def proc_net_tcp_entry(text: str, family: int, local: Tuple, remote: Tuple) -> Optional[SocketEntry]:
    """The socket from `local` to `remote` in /proc/net/tcp{,6} text (the fallback of sock_diag)."""
    local_text, remote_text = proc_net_address(family, *local[:2]), proc_net_address(family, *remote[:2])
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 9 and fields[1] == local_text and fields[2] == remote_text \
                and fields[7].isdigit() and fields[9].isdigit():
            return SocketEntry(int(fields[3], 16), int(fields[7]), int(fields[9]))
    return None


class PeerUsers:
    """Which user opened a connection: SO_PEERCRED on the Unix socket (the kernel's record of
    the connecting process, which cannot race); for loopback TCP the kernel's socket table
    (sock_diag over netlink, else /proc/net/tcp{,6}), trusted only for a live, connected
    client socket whose other end is this very socket (its inode, from fstat). None when it
    cannot be told, which the caller treats as a refusal."""

    def __init__(self, proc_root: str = "/proc"):
        self.proc_root = proc_root
        self._netlink: Optional[socket.socket] = None
        self._netlink_broken = False
        self._sequence = 0

    def close(self) -> None:
        if self._netlink is not None:
            self._netlink.close()
            self._netlink = None

    def uid_of(self, sock: Optional[socket.socket]) -> Optional[int]:
        if sock is None:
            return None
        try:
            if sock.family == socket.AF_UNIX:
                return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, SO_PEERCRED, 12))[1]
            client, server = sock.getpeername(), sock.getsockname()
            own_inode = os.fstat(sock.fileno()).st_ino
        except OSError:
            return None
        ours = self._entry(sock.family, server, client)
        if ours is None or ours.inode != own_inode:       # the table does not name this connection
            return None
        return trusted_owner(self._entry(sock.family, client, server))

    def _entry(self, family: int, local: Tuple, remote: Tuple) -> Optional[SocketEntry]:
        if not self._netlink_broken:
            try:
                return self._ask_netlink(family, local, remote)
            except (OSError, AttributeError, ValueError):
                self._netlink_broken = True     # no netlink here (a sandbox): use /proc from now on
        return self._ask_proc(family, local, remote)

    def _ask_netlink(self, family: int, local: Tuple, remote: Tuple) -> Optional[SocketEntry]:
        if self._netlink is None:
            self._netlink = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
            self._netlink.settimeout(1.0)
        self._sequence += 1
        self._netlink.send(sock_diag_request(family, local, remote, self._sequence))
        return sock_diag_entry(self._netlink.recv(8192))

    def _ask_proc(self, family: int, local: Tuple, remote: Tuple) -> Optional[SocketEntry]:
        name = "tcp6" if family == socket.AF_INET6 else "tcp"
        try:
            with open(os.path.join(self.proc_root, "net", name), "r") as handle:
                return proc_net_tcp_entry(handle.read(), family, local, remote)
        except (OSError, ValueError):
            return None


class HttpDate:
    """The Date header value, formatted once per second."""

    def __init__(self):
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode()
        return self._value


http_date = HttpDate()


def ws_message(kind: str, data: Any) -> bytes:
    """A server -> client message as one unfragmented text frame."""
    return encode_frame(Opcode.TEXT, json_bytes({"type": kind, "data": data}))


class WsSession:
    """One WebSocket connection: read loop, keepalive pings, a bounded send buffer. Thousands
    may be open: slots, no task but the connection's own (pings ride a timer), and nothing of
    the HTTP request that opened it."""
    __slots__ = ("reader", "writer", "protocol", "stats", "transport", "on_message", "send_buffer",
                 "slow_grace", "ping_interval", "pong_timeout", "behind_since", "dropped_log_lines", "closed",
                 "log_subscriptions", "type_filter", "process_filter", "_awaiting_pong", "_loop", "_ping_timer",
                 "leftover")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 protocol: WsProtocol, on_message: Callable[["WsSession", WsEvent], None],
                 send_buffer: int = WS_SEND_BUFFER, ping_interval: float = WS_PING_INTERVAL,
                 pong_timeout: float = WS_PONG_TIMEOUT, slow_grace: float = WS_SLOW_GRACE,
                 stats: Optional[ServerStats] = None):
        self.reader, self.writer, self.protocol = reader, writer, protocol
        self.stats = stats or ServerStats()
        self.transport = writer.transport
        self.on_message = on_message
        self.send_buffer, self.slow_grace = send_buffer, slow_grace
        self.ping_interval, self.pong_timeout = ping_interval, pong_timeout
        self.behind_since: Optional[float] = None
        self.dropped_log_lines = 0
        self.closed = False
        self.log_subscriptions = NO_NAMES                 # process names, or "*" for all
        self.type_filter: Optional[set] = None
        self.process_filter: Optional[set] = None
        self._awaiting_pong: Optional[bytes] = None
        self._loop = asyncio.get_event_loop()
        self._ping_timer = None
        self.leftover = b""                 # bytes read past the handshake: the first frames

    def on_log(self, line: LogLine) -> None:
        """A LogHub subscriber: the frame is built once per line for all WebSocket clients."""
        if not self.wants("log", line.process):
            return
        frame = line.memo.get("ws")
        if frame is None:
            entry = line.entry
            frame = line.memo["ws"] = ws_message("log", {"process": line.process, "type": entry.type,
                                                         "message": entry.message, "timestamp": entry.timestamp})
        self.send(frame, "log")

    def on_log_end(self, name: Optional[str]) -> None:
        self.log_subscriptions = self.log_subscriptions - {name}

    def wants(self, kind: str, process: Optional[str]) -> bool:
        if self.type_filter is not None and kind not in self.type_filter:
            return False
        return process is None or self.process_filter is None or process in self.process_filter

    def send(self, frame: bytes, kind: str = "event") -> None:
        """Queue a frame. Past the send buffer a client that does not read loses state updates
        (the next tick has the latest) and log lines (counted, then reported), keeps events,
        and is closed with 1008 once it has stayed behind for the grace period."""
        if self.closed or self.protocol.close_sent:
            return
        pending = self.transport.get_write_buffer_size()
        if pending <= self.send_buffer:
            if self.behind_since is not None:
                self.behind_since = None
                self._report_dropped()
            self.transport.write(frame)
            return
        now = self._loop.time()
        if self.behind_since is None:
            self.behind_since = now
        if now - self.behind_since > self.slow_grace or pending > WS_HARD_LIMIT * self.send_buffer:
            self.fail(CloseCode.POLICY_VIOLATION, "client too slow to read updates", drop=True)
        elif kind == "event":
            self.transport.write(frame)
            return
        elif kind == "log":
            self.dropped_log_lines += 1
        self.stats.ws_dropped += 1

    def _report_dropped(self) -> None:
        if self.dropped_log_lines:
            self.transport.write(ws_message("dropped", {"log_lines": self.dropped_log_lines,
                                                        "timestamp": iso_time(time.time())}))
            self.dropped_log_lines = 0

    def send_json(self, kind: str, data: Any) -> None:
        self.send(ws_message(kind, data))

    def fail(self, code: int, reason: str = "", drop: bool = False) -> None:
        """Start the closing handshake (RFC 6455 §7.1.7). drop: a client that does not read gets
        the close frame behind what is queued, nothing more, and is cut off if it still lags."""
        if self.closed:
            return
        frame = self.protocol.close(code, reason)
        if not frame:
            return
        self.transport.write(frame)
        if (drop or self.protocol.failed) and self.transport.can_write_eof():
            # Our close, then FIN; what the peer still sends is read and dropped until it
            # closes (closing with unread input would reset the connection and lose the frame).
            self.transport.write_eof()
        self._loop.call_later(WS_CLOSE_TIMEOUT, self._force_close)

    def _force_close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.abort()

    async def run(self) -> None:
        self._ping_timer = self._loop.call_later(self.ping_interval, self._ping)
        try:
            data, self.leftover = self.leftover, b""
            while not self.closed:
                if data:
                    if not self._receive(data):
                        break
                data = await self.reader.read(READ_CHUNK)
                if not data:
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            self._ping_timer.cancel()
            self.closed = True
            self.writer.close()

    def _receive(self, data: bytes) -> bool:
        """Feed bytes to the codec and act on its events; False when the session is over."""
        if self.protocol.close_received:
            return False
        events = self.protocol.receive_data(data)
        self._flush()
        for event in events:
            if event.kind == "error":
                self.fail(event.data.close_code, str(event.data))
                return not self.protocol.close_received
            if event.kind == "close":
                return False            # the echo is flushed; the server closes TCP first
            if event.kind == "pong":
                if self._awaiting_pong is not None and event.data == self._awaiting_pong:
                    self._awaiting_pong = None
            elif event.kind in ("text", "binary") and not self.protocol.close_sent:
                self.on_message(self, event)
        return True

    def _flush(self) -> None:
        """Send the codec's replies. Pongs count against the send buffer like everything else
        (past it they are dropped: RFC 6455 §5.5.3 lets us answer only the latest ping); a
        close frame always goes."""
        for frame in self.protocol.outgoing:
            if frame[0] & 0x0F == Opcode.PONG:
                self.send(frame, "state")
            else:
                self.transport.write(frame)
        self.protocol.outgoing.clear()

    def _ping(self) -> None:
        """A ping every ping_interval; each must be answered within pong_timeout."""
        if self.closed:
            return
        self._ping_timer = self._loop.call_later(self.ping_interval, self._ping)
        if self._awaiting_pong is None:
            token = self._awaiting_pong = os.urandom(4)
            self.send(encode_frame(Opcode.PING, token))
            self._loop.call_later(self.pong_timeout, self._check_pong, token)

    def _check_pong(self, token: bytes) -> None:
        if self._awaiting_pong == token:
            self.fail(CloseCode.POLICY_VIOLATION, "no pong within %g s" % self.pong_timeout)


NO_NAMES: frozenset = frozenset()           # shared by every session that subscribed to nothing


class Broadcaster:
    """Supervisor announcements -> WebSocket messages, each encoded once for every client;
    log subscriptions go through the supervisor's LogHub like every other log reader."""

    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor
        self.hub = supervisor.hub
        self.clients: set = set()
        self._tick_task: Optional[asyncio.Task] = None
        self._reported: Dict[int, tuple] = {}       # per process id: what the clients were last told
        self._next_full = -math.inf
        self._handlers = {"process_update": self.send_process, "process_event": self.send_event,
                          "health_update": self.send_health, "tick": self.send_tick}
        supervisor.listeners.append(self.on_announcement)

    def on_announcement(self, kind: str, payload: Any) -> None:
        if self.clients:
            self._handlers[kind](payload)

    def broadcast(self, kind: str, data: Any, process: Optional[str] = None, priority: str = "event") -> None:
        frame = ws_message(kind, data)
        for client in list(self.clients):
            if client.wants(kind, process):
                client.send(frame, priority)

    def send_event(self, data: dict) -> None:
        self.broadcast("process_event", data, data["process"])

    def send_health(self, data: dict) -> None:
        self.broadcast("health_update", data, data["process"])

    def send_process(self, runner: ProcessRunner) -> None:
        self._cancel_tick()
        data = process_update(runner, self.supervisor.wall(), self.supervisor.clock())
        self._reported[runner.id] = reported_fields(data)
        self.broadcast("process_update", data, runner.name, priority="state")

    def send_tick(self, system: SystemMetrics) -> None:
        """Every sample: system_update, and a process_update for each process whose reported
        fields changed since the clients were last told (a sleeping process costs nothing);
        every FULL_STATE_INTERVAL, one for each process, for a client that lost an update. A
        client without filters gets them as one write (one syscall rather than 1 + N per client)."""
        now, wall = self.supervisor.clock(), self.supervisor.wall()
        full = now >= self._next_full
        if full:
            self._next_full = now + FULL_STATE_INTERVAL
        messages = [("system_update", None, ws_message("system_update", system.to_update()))]
        reported = {}
        for runner in self.supervisor.registry.runners():
            data = process_update(runner, wall, now)
            reported[runner.id] = fields = reported_fields(data)
            if full or self._reported.get(runner.id) != fields:
                messages.append(("process_update", runner.name, ws_message("process_update", data)))
        self._reported = reported
        batch = b"".join(frame for _, _, frame in messages)
        clients = list(self.clients)
        self._cancel_tick()
        if len(clients) <= FANOUT_CHUNK:
            self._deliver_tick(clients, messages, batch)
        else:       # thousands of clients: let requests in between chunks
            self._tick_task = asyncio.ensure_future(self._fan_out(clients, messages, batch))

    async def _fan_out(self, clients: List["WsSession"], messages, batch: bytes) -> None:
        for start in range(0, len(clients), FANOUT_CHUNK):
            if start:
                await asyncio.sleep(0)
            self._deliver_tick(clients[start:start + FANOUT_CHUNK], messages, batch)

    @staticmethod
    def _deliver_tick(clients: List["WsSession"], messages, batch: bytes) -> None:
        for client in clients:
            if client.type_filter is None and client.process_filter is None:
                client.send(batch, "state")
            else:
                for kind, process, frame in messages:
                    if client.wants(kind, process):
                        client.send(frame, "state")

    def _cancel_tick(self) -> None:
        """A newer state supersedes a tick still being fanned out (latest state wins)."""
        if self._tick_task is not None and not self._tick_task.done():
            self._tick_task.cancel()
        self._tick_task = None

    def add_client(self, client: "WsSession") -> None:
        self.clients.add(client)

    def remove_client(self, client: "WsSession") -> None:
        self.clients.discard(client)
        self.hub.unsubscribe(client, client.log_subscriptions)
        client.log_subscriptions = NO_NAMES

    def send_initial_state(self, client: "WsSession") -> None:
        """A new client gets the current state at once rather than at the next tick."""
        now, wall = self.supervisor.clock(), self.supervisor.wall()
        for runner in self.supervisor.registry.runners():
            if client.wants("process_update", runner.name):
                client.send(ws_message("process_update", process_update(runner, wall, now)))
        if client.wants("system_update", None):
            client.send(ws_message("system_update", self.supervisor.system.to_update()))

    def on_client_message(self, client: "WsSession", event: WsEvent) -> None:
        """Client commands: subscribe/unsubscribe to logs, filter updates, ping."""
        try:
            kind, data = self.run_command(client, self._parse_command(event))
        except WsCommandError as error:
            kind, data = "error", {"code": error.code, "message": error.message}
        except PMDaemonError as error:          # a domain error (no such process): its usual code
            kind, data = "error", error_body(wire_error(error))
        data["timestamp"] = iso_time(self.supervisor.wall())   # every data carries one
        client.send_json(kind, data)

    @staticmethod
    def _parse_command(event: WsEvent) -> Any:
        if event.kind != "text":
            return None
        try:
            return parse_json_text(event.data)
        except InvalidJson as exc:
            raise WsCommandError("invalid JSON: %s" % exc.message, "INVALID_JSON") from None

    def run_command(self, client: "WsSession", command: Any) -> Tuple[str, dict]:
        if not isinstance(command, dict) or not isinstance(command.get("type"), str):
            raise WsCommandError("a command is a JSON object with a string 'type'")
        kind = command["type"]
        if kind in ("subscribe", "unsubscribe"):
            return self._subscription(client, kind, command)
        if kind == "filter":
            client.type_filter = self._string_set(command, "types")
            client.process_filter = self._string_set(command, "processes")
            return "filtered", {"types": sorted(client.type_filter) if client.type_filter is not None else None,
                                "processes": sorted(client.process_filter) if client.process_filter is not None else None}
        if kind == "ping":
            return "pong", {}
        raise WsCommandError("unknown command type %r (subscribe, unsubscribe, filter, ping)" % kind[:40])

    def _subscription(self, client: "WsSession", kind: str, command: dict) -> Tuple[str, dict]:
        if command.get("channel") != "logs":
            raise WsCommandError("unknown channel %r; the channel is 'logs'" % str(command.get("channel"))[:40])
        name = command.get("process", "*")
        if not isinstance(name, str):
            raise WsCommandError("'process' must be a process name or '*'")
        if kind == "subscribe":
            names = {"*"} if name == "*" else {runner.name for runner in self.supervisor.resolve(name)}
            if len(client.log_subscriptions | names) > MAX_WS_SUBSCRIPTIONS:
                raise WsCommandError("at most %d log subscriptions" % MAX_WS_SUBSCRIPTIONS, "TOO_MANY_SUBSCRIPTIONS")
            client.log_subscriptions |= names
            self.hub.subscribe(client, names)
        else:                       # a group name, or a name that no longer exists, both work
            names = {name} | {runner.name for runner in self.supervisor.registry.group(name)}
            client.log_subscriptions -= names
            self.hub.unsubscribe(client, names)
        return kind + "d", {"channel": "logs", "process": command.get("process", "*")}

    @staticmethod
    def _string_set(command: dict, field: str) -> Optional[set]:
        value = command.get(field)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or len(value) > 1024:
            raise WsCommandError("%r must be an array of strings or null" % field)
        return set(value)


class TlsFiles:
    """HTTPS and WSS on the same port: TLS 1.2+ with forward-secret AEAD ciphers. reload()
    re-reads the files (SIGUSR1): new handshakes get the new certificate, open connections stay."""

    def __init__(self, cert: str, key: str):
        self.cert, self.key = cert, key
        self.context = self.load()              # the listening socket's context, for good
        self.current = self.context             # the one whose certificate handshakes get
        # The server holds the first context for its lifetime; each handshake is pointed at
        # the current one when its ClientHello arrives (called with or without SNI).
        if hasattr(self.context, "sni_callback"):
            self.context.sni_callback = self._choose
        else:                                   # Python 3.6
            self.context.set_servername_callback(self._choose)

    def load(self):
        """A fresh server context with the files as they are now; raises if they do not fit."""
        import ssl
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        set_tls_floor(context)
        context.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")       # TLS 1.2; 1.3 has its own
        context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
        context.load_cert_chain(self.cert, self.key)
        return context

    def _choose(self, connection, server_name, context) -> None:
        if self.current is not context:
            connection.context = self.current

    def reload(self) -> None:
        # Loaded into a fresh context and swapped in only when whole: loading a certificate
        # whose key does not match into the live context would leave it broken (new cert, old key).
        try:
            fresh = self.load()
        except (OSError, ValueError) as exc:
            log.error("TLS files not reloaded, the old certificate stays: %s", exc)
            return
        self.current = fresh
        log.info("TLS certificate reloaded from %s", self.cert)


def bind_tcp(host: str, port: int) -> List[socket.socket]:
    """A socket bound to each address of host, not yet listening: connections are refused, not
    queued, until start_serving (asyncio's start_serving=False, which 3.6 lacks)."""
    addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(addresses):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:       # as asyncio: "::" is not also 0.0.0.0
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def adopt_listeners(inherited: dict, host: str, port: int) -> Tuple[List[socket.socket], Optional[socket.socket]]:
    """The listening sockets an upgrade handed over (HttpServer.hand_over): the TCP ones when
    they are still wanted (same host, and the same port or any), and the Unix socket."""
    tcp: List[socket.socket] = []
    for descriptor, family in inherited.get("tcp", []):
        sock = socket.fromfd(descriptor, family, socket.SOCK_STREAM)   # a duplicate: 3.6 cannot adopt
        os.close(descriptor)
        tcp.append(sock)
    if tcp and (inherited.get("host") != host or port not in (0, tcp[0].getsockname()[1])):
        for sock in tcp:                        # new options: a new port, bound by the caller
            sock.close()
        tcp = []
    unix = None
    if inherited.get("unix") is not None:
        unix = socket.fromfd(inherited["unix"], socket.AF_UNIX, socket.SOCK_STREAM)
        os.close(inherited["unix"])
    return tcp, unix


class After(enum.Enum):
    """What a connection does once it has answered a request."""
    NEXT_REQUEST = "next request"       # keep-alive: read the next head
    CLOSE = "close"
    UPGRADE = "upgrade"                 # it is a WebSocket session now (HttpConnection.session)


class Admitted(NamedTuple):
    """A head the API let through: its body may come, holding `reserved` bytes of the
    daemon-wide body budget meanwhile, then its handler runs."""
    reserved: int


NOTHING_RESERVED = Admitted(0)          # most heads: no body


class AnsweredFromHead(NamedTuple):
    """A head answered without reading a body: OPTIONS, or a refusal of a request that has no
    body (the connection stays open for the next request)."""
    response: Response


# A connection's phases, each with its own deadline (see HttpConnection.run).
IDLE, HEAD, BODY = "idle", "head", "body"


class HttpConnection:
    """One client connection, from its first byte to its close or upgrade: the keep-alive loop,
    the phase its deadline belongs to, the body budget its request holds, and send(), the only
    place its bytes leave. HttpServer makes one per accepted connection."""
    __slots__ = ("server", "api", "config", "stats", "reader", "writer", "transport", "owner", "parser",
                 "phase", "deadline", "admission", "fresh", "session", "repeated", "answered", "_loop")

    def __init__(self, server: "HttpServer", reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 owner: bool = False):
        self.server, self.api, self.config = server, server.api, server.config
        self.stats = server.api.server_stats
        self.reader, self.writer, self.transport = reader, writer, writer.transport
        self.owner = owner                  # the Unix socket's checked peer: the daemon's own user
        self.parser = RequestParser(self.config.max_body_bytes)
        self._loop = asyncio.get_event_loop()
        self.phase = IDLE
        self.deadline = self._loop.time() + self.config.header_timeout   # absolute, for the phase
        self.admission: Any = None          # Admitted or AnsweredFromHead, for the request under way
        self.fresh: Optional[bytes] = None  # one read that began a request on an empty buffer
        self.session: Optional[WsSession] = None    # once upgraded
        # Heads answered before, one table per door: through the Unix socket the daemon's own
        # user needs no key, so a head learned there must never answer a TCP client.
        self.repeated: RepeatedAnswers = server.repeated[owner]
        self.answered = False               # a request was answered: idle now means between requests

    def send(self, what: Any, request: Optional[Request] = None, keep_alive: bool = False) -> None:
        """The only place bytes leave: a Response, serialised for `request` (101 included), or
        bytes already framed (an answer of the fast path, a chunk, 100 Continue)."""
        if type(what) is not bytes:
            http10 = request is not None and request.version == "HTTP/1.0"
            head_only = request is not None and request.method == "HEAD"
            what = serialize_response(what, http_date(), keep_alive, http10, head_only)
        self.writer.write(what)

    async def drain(self) -> None:
        """Wait for a client that reads slowly, within write_timeout."""
        if self.transport.get_write_buffer_size() > WRITE_BUFFER_HIGH:
            await asyncio.wait_for(self.writer.drain(), self.config.write_timeout)

    async def run(self) -> Optional[WsSession]:
        """Requests in order until the connection closes (None) or is upgraded (its WsSession).
        A head is admitted (or refused and answered) before any of its body is read; deadlines
        are absolute per phase: a header block within header_timeout of its first byte, a body
        within body_timeout of its head, the next request within keepalive_timeout."""
        self.server.watch_deadline(self)
        try:
            while True:
                try:
                    request = self._next_request()
                except PMDaemonError as error:
                    self.deadline = math.inf
                    await self.answer_and_close(self.api.error_response(
                        error, getattr(error, "request", None) or self.parser.head_or_none()))
                    return None
                if request is None:
                    data = await self._read()
                    if not data:
                        return None
                    self.parser.feed(data)
                    continue
                self.deadline = math.inf                # our turn: the client is not late
                admission = self.admission
                self._release_body_budget()
                learnable = self.fresh if not self.parser.buffer else None   # the request was that one read
                self.fresh = None
                after = await self._respond(request, admission, learnable)
                self.answered = True
                if after is not After.NEXT_REQUEST:
                    return self.session
                request = admission = learnable = None     # nothing of it kept while idle
                self.phase, self.deadline = IDLE, self._loop.time() + self.config.keepalive_timeout
        finally:
            self.server.deadlines.discard(self)
            self._release_body_budget()

    def _next_request(self) -> Optional[Request]:
        """Admit a new head, then the complete request, or None for more bytes; raises to refuse."""
        head = self.parser.head()
        if head is not None and self.admission is None:
            head.owner = self.owner
            self.admission = self._admit(head)
        return self.parser.next_request()

    def _admit(self, head: Request) -> Any:
        """Decide a request from its head alone: refuse it (raise: answered, then closed, its
        body never read), answer it at once (a refusal without a body keeps the connection),
        or let its body come: reserve the body's bytes in the daemon-wide budget, then say
        100 Continue if asked (RFC 9110 §10.1.1)."""
        has_body = head.chunked or head.content_length > 0
        try:
            early = self.api.admit(head)
        except PMDaemonError as error:
            if has_body:
                raise
            early = self.api.error_response(error, head)
        if early is not None:
            return AnsweredFromHead(early)
        if not has_body:
            return NOTHING_RESERVED
        server = self.server
        wanted = self.config.max_body_bytes if head.chunked else head.content_length
        if server.body_memory + wanted > self.config.max_body_memory:
            raise HttpError(503, "SERVICE_UNAVAILABLE", "too many request bodies in flight; retry shortly",
                            headers=(("Retry-After", "1"),), close=True)
        server.body_memory += wanted
        if head.header("expect", "").lower() == "100-continue":
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        return Admitted(wanted)

    def _release_body_budget(self) -> None:
        """The request is in (or the connection gone): its reserved bytes go back to the budget."""
        admission, self.admission = self.admission, None
        if type(admission) is Admitted:
            self.server.body_memory -= admission.reserved

    async def _respond(self, request: Request, admission: Any, learnable: Optional[bytes]) -> After:
        """Answer one complete request. `learnable`: its exact bytes, when it came in one read
        of its own (RepeatedAnswers)."""
        if type(admission) is AnsweredFromHead:
            response = admission.response
        else:
            response = await self.api.handle(request)
        if response.status == 101:
            return await self._upgrade(request, response)
        if response.stream is not None:
            await self._stream(request, response)
            return After.CLOSE
        keep_alive = request.keep_alive and not response.close and not self.server.closing
        if learnable is not None:
            self.repeated.learn(learnable, request, response, keep_alive)
        self.stats.answered(response.status)
        self.send(response, request, keep_alive)
        if self.transport.get_write_buffer_size() > WRITE_BUFFER_HIGH:
            await self.drain()
        if not keep_alive and response.close:
            await self.answer_and_close(None)
        return After.NEXT_REQUEST if keep_alive else After.CLOSE

    # -- the fast path: heads answered before, answered again without parsing (RepeatedAnswers) --

    async def _read(self) -> bytes:
        """The next bytes of a request. While idle, a read that is exactly a head answered
        before is answered here, byte for byte as the full path would, and the next is read."""
        parser = self.parser
        phase = BODY if parser.in_body else (HEAD if parser.has_partial else IDLE)
        if phase != self.phase:
            self.phase = phase
            self.deadline = self._loop.time() + (self.config.body_timeout if phase == BODY
                                                 else self.config.header_timeout)
        reader = self.reader
        data = await reader.read(READ_CHUNK)
        if phase != IDLE:
            self.fresh = None
            return data
        repeated, stats, transport, server = self.repeated, self.stats, self.transport, self.server
        while data and not server.closing:
            answer = repeated.answer(data, http_date())
            if answer is None:
                break
            stats.answered(200)
            self.send(answer)
            if transport.get_write_buffer_size() > WRITE_BUFFER_HIGH:     # no coroutine when not needed
                await self.drain()
            self.deadline = self._loop.time() + self.config.keepalive_timeout
            answer = data = None                # nothing of it kept while idle
            data = await reader.read(READ_CHUNK)
        self.fresh = data
        return data

    # -- endings: refusal, timeout, stream, upgrade --------------------------------------------

    async def answer_and_close(self, response: Optional[Response]) -> None:
        """Answer, half-close, and discard (never parse or keep) what the client still sends
        for a moment, so that it can read our answer rather than a reset."""
        if response is not None:
            self.stats.answered(response.status)
            self.send(response)
        reader, writer = self.reader, self.writer
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.drain(), 5)
            if writer.can_write_eof():
                writer.write_eof()
            deadline = self._loop.time() + LINGER_SECONDS
            discarded = 0
            while discarded < LINGER_BYTES:
                chunk = await asyncio.wait_for(reader.read(READ_CHUNK), deadline - self._loop.time())
                if not chunk:
                    break
                discarded += len(chunk)

    def expire(self) -> None:
        """The phase's deadline passed (HttpServer's sweeper): a request under way is told why."""
        if self.parser.has_partial:
            self.send(self.api.error_response(HttpError(408, "REQUEST_TIMEOUT", "request not received in time")))
        self.transport.close()

    async def _stream(self, request: Request, response: Response) -> None:
        """Chunked transfer (raw for HTTP/1.0) of an async iterator until it ends or the client
        leaves; an ended stream always gets its final chunk."""
        task = current_task()
        self.server.streams.add(task)
        http10 = request.version == "HTTP/1.0"
        self.send(response, request)
        client_gone = asyncio.ensure_future(self.reader.read(1))
        chunks = response.stream.__aiter__()
        try:
            while True:
                next_chunk = asyncio.ensure_future(chunks.__anext__())
                done, _ = await asyncio.wait({next_chunk, client_gone}, return_when=asyncio.FIRST_COMPLETED)
                if next_chunk not in done:
                    next_chunk.cancel()
                    return
                try:
                    chunk = next_chunk.result()
                except StopAsyncIteration:
                    break
                self.send(chunk if http10 else b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await asyncio.wait_for(self.writer.drain(), self.config.write_timeout)
            if not http10:
                self.send(b"0\r\n\r\n")
            await asyncio.wait_for(self.writer.drain(), self.config.write_timeout)
        finally:
            self.server.streams.discard(task)
            client_gone.cancel()
            with contextlib.suppress(Exception):
                await chunks.aclose()

    async def _upgrade(self, request: Request, response: Response) -> After:
        """Complete a handshake the API accepted: the 101 (with its CORS headers), then the
        session that runs the connection from now on (self.session)."""
        broadcaster = self.server.broadcaster
        if broadcaster is None or len(broadcaster.clients) >= self.config.max_ws_clients:
            await self.answer_and_close(self.api.error_response(
                HttpError(503, "SERVICE_UNAVAILABLE", "too many WebSocket clients"), request))
            return After.CLOSE
        self.send(response, request)
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            # Bound the kernel's share too: autotuning would let 10,000 idle readers pin
            # megabytes each; a status feed needs little.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, WS_KERNEL_SEND_BUFFER)
        config = self.config
        session = WsSession(self.reader, self.writer, WsProtocol(), broadcaster.on_client_message,
                            ping_interval=config.ws_ping_interval, pong_timeout=config.ws_pong_timeout,
                            slow_grace=config.ws_slow_grace, stats=self.stats)
        session.leftover = bytes(self.parser.buffer)
        broadcaster.add_client(session)         # counted now: no await before the session runs
        self.stats.ws_clients = len(broadcaster.clients)
        self.session = session
        return After.UPGRADE


class HttpServer:
    """Accepts connections (TCP, TLS, the Unix socket) within the caps, checks who opened them
    where that matters, and hands each to an HttpConnection; runs the WebSocket session of one
    that was upgraded. Holds what connections share: the body budget, deadlines, repeated heads."""

    def __init__(self, api: Api, broadcaster: Optional[Broadcaster], config: DaemonConfig):
        self.api = api
        self.broadcaster = broadcaster
        self.config = config
        self.connections: set = set()
        self.streams: set = set()           # tasks serving ?follow=true: ended cleanly on close
        self.peer_users = PeerUsers()
        self.body_memory = 0                # bytes reserved by request bodies being received
        self.socket_path = os.path.join(config.home, SOCKET_NAME)
        self.unix_socket = None
        self.deadlines: set = set()         # HttpConnections whose phase has a deadline
        self._sweeper_asleep: Optional[asyncio.Event] = None
        self.closing = False
        self.handing_over = False           # an upgrade: what was accepted is still served
        self.listeners: List[socket.socket] = []
        self.servers: list = []                 # asyncio servers, once serving
        self.acceptors: List[asyncio.Future] = []   # with TLS: our own accept loops (_accept_tls)
        self.handshakes = 0                 # TLS connections accepted and not yet through their handshake
        self._sweeper = None
        # Heads answered before, one table per door (see HttpConnection.repeated).
        self.repeated = {False: RepeatedAnswers(), True: RepeatedAnswers()}     # by request.owner

    async def bind(self, inherited: Optional[dict] = None) -> int:
        """Take the port (so a busy port fails before any child starts) and the Unix socket;
        serve later. With TLS, connections are accepted by us, not by asyncio's TLS server: a
        connection counts from its accept, before a byte of TLS (see _accept_tls). After an
        upgrade, the listening sockets of the previous image (hand_over) are taken as they
        are, with the connections waiting in their backlog, unless the port or host changed."""
        self.listeners, unix = adopt_listeners(inherited or {}, self.config.host, self.config.port)
        if not self.listeners:
            self.listeners = bind_tcp(self.config.host, self.config.port)
        if unix is not None:
            self.unix_socket = unix
        else:
            self._bind_unix_socket()
        return self.listeners[0].getsockname()[1]

    async def _accept_tls(self, listener: socket.socket) -> None:
        """Accept TLS connections, each counted from its accept: within max_connections in
        all, at most MAX_TLS_HANDSHAKES in handshake at once (asyncio gives each a 256 KiB
        buffer), each given header_timeout to finish it. Past a limit, a connection is closed
        at once: silent clients cannot pile up memory before they have said a word."""
        loop = asyncio.get_event_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:              # out of descriptors, say: try again shortly
                loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                             "exception": exc})
                await asyncio.sleep(ACCEPT_RETRY_DELAY)
                continue
            if (self.handshakes >= MAX_TLS_HANDSHAKES or self.closing
                    or len(self.connections) + self.handshakes >= self.config.max_connections):
                sock.close()
                continue
            self.handshakes += 1
            self._count_connections()
            asyncio.ensure_future(self._handshake(sock))

    async def _handshake(self, sock: socket.socket) -> None:
        """TLS on an accepted socket, then serve() as for any connection."""
        def protocol():
            return asyncio.StreamReaderProtocol(asyncio.StreamReader(), self.serve)
        try:
            await asyncio.wait_for(asyncio.get_event_loop().connect_accepted_socket(
                protocol, sock, ssl=self.config.tls.context), self.config.header_timeout)
        except (asyncio.TimeoutError, OSError):
            sock.close()                        # asyncio has closed its transport, if it made one
        finally:
            self.handshakes -= 1
            self._count_connections()

    def _count_connections(self) -> None:
        """The gauge counts every connection from its accept, TLS handshakes included."""
        self.api.server_stats.connections = len(self.connections) + self.handshakes

    def _bind_unix_socket(self) -> None:
        """$PMDAEMON_HOME/pmdaemon.sock, mode 0600 from its creation (the home lock is ours,
        so a socket file left there is a leftover of ours)."""
        with contextlib.suppress(FileNotFoundError):
            if stat_module.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                os.unlink(self.socket_path)
        previous = os.umask(0o177)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.socket_path)
            self.unix_socket = sock
        except (OSError, ValueError) as exc:    # a path too long for sun_path, say: TCP still works
            sock.close()
            log.warning("no Unix socket at %s: %s", self.socket_path, getattr(exc, "strerror", None) or exc)
        finally:
            os.umask(previous)

    async def start_serving(self) -> None:
        self._sweeper = asyncio.ensure_future(self._sweep_deadlines())
        for sock in self.listeners:
            if self.config.tls:
                sock.listen(1024)
                sock.setblocking(False)
                self.acceptors.append(asyncio.ensure_future(self._accept_tls(sock)))
            else:
                self.servers.append(await asyncio.start_server(self.serve, sock=sock, backlog=1024))
        if self.unix_socket is not None:
            self.servers.append(await asyncio.start_unix_server(self.serve, sock=self.unix_socket))

    async def close(self) -> None:
        """Stop accepting; end follow streams with their final chunk and WebSockets with 1001."""
        self._stop_accepting()
        if self.unix_socket is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)
        await self._end_sessions(CloseCode.GOING_AWAY, "daemon shutting down", self.config.write_timeout)
        for writer in list(self.connections):
            writer.close()

    async def hand_over(self) -> dict:
        """Upgrade, before the exec: stop accepting but keep the listening sockets open (new
        connections wait in the backlog; none is refused), finish the requests in flight,
        close idle keep-alive connections, end follow streams with their final chunk and
        WebSockets with 1012. Returns the listening descriptors, inheritable, for bind()."""
        kept = {"host": self.config.host, "tcp": [], "unix": None}
        for sock in self.listeners:
            kept["tcp"].append([os.dup(sock.fileno()), int(sock.family)])
        if self.unix_socket is not None:
            kept["unix"] = os.dup(self.unix_socket.fileno())
        for descriptor in [entry[0] for entry in kept["tcp"]] + [kept["unix"]]:
            if descriptor is not None:
                os.set_inheritable(descriptor, True)
        self.handing_over = True
        # No accept from now on, but what was just accepted must reach serve() while its server
        # is open: asyncio drops (and leaks) a connection accepted right before Server.close().
        loop = asyncio.get_event_loop()
        for sock in self.listeners + ([self.unix_socket] if self.unix_socket is not None else []):
            loop.remove_reader(sock.fileno())
        for _ in range(3):
            await asyncio.sleep(0)
        self._stop_accepting()                  # closes our copies; the duplicates keep listening
        sessions = list(self.broadcaster.clients if self.broadcaster else ())
        await self._end_sessions(CloseCode.SERVICE_RESTART, "daemon upgrading",
                                 min(self.config.write_timeout, UPGRADE_DRAIN_TIMEOUT), drop=True)
        began = time.monotonic()
        idle = {True: 0, False: 0}

        def waiting() -> set:
            # A WebSocket is done once its close frame is out (its reply is not waited for), or
            # after the grace: one that does not read would hold every client up.
            patient = time.monotonic() < began + UPGRADE_GRACE
            return self.connections - {session.writer for session in sessions
                                       if not patient or not session.transport.get_write_buffer_size()}
        # A few turns of the loop at least: a request that arrived with the close is read.
        while (waiting() or time.monotonic() < began + 0.005) and time.monotonic() < began + UPGRADE_DRAIN_TIMEOUT:
            patient = time.monotonic() < began + UPGRADE_GRACE
            for connection in list(self.deadlines):
                # Idle: between requests, nothing of the next one read (a new connection gets
                # a moment to send its first). A request under way is answered with
                # Connection: close (closing), then its connection ends.
                if (connection.phase == IDLE and not connection.parser.buffer and connection.session is None
                        and (connection.answered or not patient)):
                    idle[connection.answered] += 1
                    connection.transport.close()
            await asyncio.sleep(0.005)
        cut = waiting()
        for writer in cut:                      # the exec closes the WebSockets
            writer.transport.abort()
        log.info("upgrade: connections finished in %.0f ms: %d idle between requests and %d silent new ones "
                 "closed, %d cut off, %d WebSocket(s) closed with 1012", (time.monotonic() - began) * 1000,
                 idle[True], idle[False], len(cut), len(sessions))
        return kept

    def _stop_accepting(self) -> None:
        self.closing = True
        for server in self.servers:
            server.close()
        for acceptor in self.acceptors:
            acceptor.cancel()
        for sock in self.listeners:             # closed by their server, or never served
            sock.close()
        if self.unix_socket is not None:
            self.unix_socket.close()
        self.peer_users.close()
        if self._sweeper is not None:
            self._sweeper.cancel()

    async def _end_sessions(self, code: int, reason: str, timeout: float, drop: bool = False) -> None:
        self.api.supervisor.hub.end(None)
        for session in list(self.broadcaster.clients if self.broadcaster else ()):
            session.fail(code, reason, drop)
        if self.streams:
            await asyncio.wait(set(self.streams), timeout=timeout)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Hand an accepted connection to its HttpConnection, within the connection cap and,
        on the Unix socket (or with peer checks), once the kernel has said who opened it."""
        sock = writer.get_extra_info("socket")
        owner = sock is not None and sock.family == socket.AF_UNIX
        connection = HttpConnection(self, reader, writer, owner)
        if len(self.connections) >= self.config.max_connections or (self.closing and not self.handing_over):
            connection.send(self.api.error_response(HttpError(503, "SERVICE_UNAVAILABLE", "too many connections")))
            writer.close()
            return
        if owner or self.api.policy.checks_peers:
            try:                                # decided before a single byte is read
                self.api.policy.check_peer(self.peer_users.uid_of(sock))
            except HttpError as refusal:
                await connection.answer_and_close(self.api.error_response(refusal))
                writer.close()
                return
        self.connections.add(writer)
        self._count_connections()
        try:
            session = await connection.run()
            if session is not None:     # upgraded: the HTTP loop and its request are gone
                await self._run_websocket(session)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.TimeoutError:
            writer.transport.abort()
        except Exception:
            log.exception("connection handler failed")
        finally:
            self.connections.discard(writer)
            self._count_connections()
            writer.close()

    def watch_deadline(self, connection: "HttpConnection") -> None:
        self.deadlines.add(connection)
        if self._sweeper_asleep is not None:
            self._sweeper_asleep.set()

    async def _sweep_deadlines(self) -> None:
        """One timer for all connections: cheaper than a timer per read on the hot path. It
        sleeps until the earliest deadline, and never longer than the shortest timeout: a
        deadline set meanwhile is at least that far away, so the sweeper wakes before it and
        then sleeps until it. With no connection it sleeps until one comes: an idle daemon, or
        one with idle clients, wakes once a sample and not four times a second."""
        loop = asyncio.get_event_loop()
        config = self.config
        longest_sleep = max(DEADLINE_SWEEP_INTERVAL,
                            min(config.header_timeout, config.body_timeout, config.keepalive_timeout))
        while True:
            if not self.deadlines:
                self._sweeper_asleep = asyncio.Event()
                await self._sweeper_asleep.wait()
                self._sweeper_asleep = None
            # (The connection that woke it may be gone already: a TLS request read with the
            # handshake is answered without the serving task ever yielding.)
            earliest = min((connection.deadline for connection in self.deadlines), default=math.inf)
            await asyncio.sleep(min(max(earliest - loop.time(), DEADLINE_SWEEP_INTERVAL), longest_sleep))
            now = loop.time()
            for connection in [c for c in self.deadlines if c.deadline <= now]:
                self.deadlines.discard(connection)
                connection.expire()

    async def _run_websocket(self, session: WsSession) -> None:
        broadcaster, stats = self.broadcaster, self.api.server_stats
        try:
            broadcaster.send_initial_state(session)
            await session.run()
        finally:
            broadcaster.remove_client(session)
            stats.ws_clients = len(broadcaster.clients)


# ==============================================================================================
# 11. Daemon runtime
#     What `web` needs around the server: the home checked (and its ancestors), the lock, the
#     key wiped from the environment, prctl, the file limit, the child watcher, the daemon's own
#     log, the code cache, systemd's notifications, the options recorded in the home, the daemon
#     started in the background, and command_web, which puts them together. Uses sections 1-10.
# ==============================================================================================

class HomeError(PMDaemonError):
    """The home directory cannot be trusted or used; the message names the fix."""


def secure_home(home: str, uid: Optional[int] = None) -> None:
    """Make sure the home is ours before anything in it is read or written: created 0700; it
    and everything in it (and in logs/) owned by this user, not writable by group or others,
    and no symbolic links, which the daemon never writes through. Our own files are tightened
    to 0600 (an older version left them to the umask); anything else is a HomeError."""
    uid = os.getuid() if uid is None else uid
    check_ancestors(home, uid)
    logs = os.path.join(home, "logs")
    for directory in (home, logs):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise HomeError("cannot create %s: %s" % (directory, exc.strerror or exc)) from None
        info = _check_owned(directory, uid)
        if not stat_module.S_ISDIR(info.st_mode):
            raise HomeError("%s is not a directory" % directory)
        if info.st_mode & 0o077:
            os.chmod(directory, 0o700)
    for directory in (home, logs):
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_symlink():
                    raise HomeError("%s is a symbolic link; pmdaemon never writes through links: "
                                    "remove it" % entry.path)
                info = _check_owned(entry.path, uid)
                if stat_module.S_ISREG(info.st_mode) and info.st_mode & 0o077:
                    os.chmod(entry.path, 0o600)


def check_ancestors(home: str, uid: int) -> None:
    """Every directory above the home (as given, and as links resolve it) belongs to root or
    this user and is writable by no one else unless sticky, as sshd's StrictModes asks: whoever
    could rename a directory above the home could swap in a home of their own, code cache and
    state included."""
    paths = {os.path.abspath(home), os.path.realpath(home)}
    ancestors = set()
    for path in paths:
        while True:
            parent = os.path.dirname(path)
            if parent == path:
                break
            ancestors.add(parent)
            path = parent
    for directory in sorted(ancestors):
        try:
            info = os.lstat(directory)
        except OSError as exc:
            raise HomeError("cannot check %s: %s" % (directory, exc.strerror or exc)) from None
        if info.st_uid not in (0, uid):
            raise HomeError("%s, above the home, belongs to uid %d: that user could swap the home "
                            "for one of their own; use a home whose every parent is root's or yours"
                            % (directory, info.st_uid))
        if stat_module.S_ISDIR(info.st_mode) and info.st_mode & 0o022 and not info.st_mode & stat_module.S_ISVTX:
            raise HomeError("%s, above the home, is writable by group or others (mode %o) and not "
                            "sticky: they could swap the home; run: chmod go-w %s"
                            % (directory, info.st_mode & 0o7777, directory))


def _check_owned(path: str, uid: int) -> os.stat_result:
    info = os.lstat(path)
    if stat_module.S_ISLNK(info.st_mode):
        raise HomeError("%s is a symbolic link; pmdaemon never writes through links: remove it, or "
                        "give the directory it points to with --home" % path)
    if info.st_uid != uid:
        raise HomeError("%s belongs to uid %d, not to this user (uid %d): another user could plant "
                        "processes or read secrets there; use a home of your own" % (path, info.st_uid, uid))
    if info.st_mode & 0o022:
        raise HomeError("%s is writable by group or others (mode %o); run: chmod go-w %s"
                        % (path, info.st_mode & 0o777, path))
    return info


class SystemdNotifier:
    """sd_notify(3) without libsystemd: READY=1 once serving, STOPPING=1 on shutdown, and
    WATCHDOG=1 at half of WatchdogSec, as datagrams to $NOTIFY_SOCKET. Silent elsewhere."""

    def __init__(self, environ: Optional[Dict[str, str]] = None):
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET") or None
        self.address = "\0" + address[1:] if address and address.startswith("@") else address
        usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine else None

    def notify(self, message: str) -> None:
        if not self.address:
            return
        with contextlib.suppress(OSError):
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as channel:
                channel.sendto(message.encode("utf-8"), self.address)

    def reloading(self) -> None:
        """An upgrade begins (the pid stays): READY=1 of the next image ends it. systemd wants
        the monotonic time with RELOADING=1 (Type=notify-reload, sd_notify(3))."""
        self.notify("RELOADING=1\nMONOTONIC_USEC=%d\nSTATUS=upgrading in place" % (time.monotonic() * 1e6))

    async def watchdog(self) -> None:
        while self.watchdog_interval:
            await asyncio.sleep(self.watchdog_interval)
            self.notify("WATCHDOG=1")


def read_private_json(path: str, remove: bool = False) -> Optional[dict]:
    """A JSON object from a private, plain file of ours in the home (removed once read when
    asked); None when there is none or it cannot be trusted."""
    try:
        descriptor = open_private(path, os.O_RDONLY)
    except OSError:
        return None
    with open(descriptor, "rb") as handle:
        if remove:
            with contextlib.suppress(OSError):
                os.unlink(path)
        info = os.fstat(handle.fileno())
        if not stat_module.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            return None
        try:
            data = json.loads(handle.read().decode("utf-8"))
        except ValueError:
            return None
    return data if isinstance(data, dict) else None


def take_inventory(home: str) -> dict:
    """In the image an upgrade started: what the previous one handed over (UPGRADE_ENV names
    it); {} on an ordinary start. Read once: the variable and the file are removed at once,
    so no child inherits them and a later start cannot take them for its own."""
    nonce = os.environ.pop(UPGRADE_ENV, None)
    if nonce is None:
        return {}
    inventory = read_private_json(os.path.join(home, UPGRADE_INVENTORY_NAME), remove=True)
    if not inventory or inventory.get("nonce") != nonce:
        log.warning("an upgrade left no usable inventory: the processes are restarted")
        return {}
    return inventory


class Daemon:
    """pmdaemon web: lock the home, restore state, serve, and shut down cleanly on a signal;
    on SIGUSR2 (`upgrade`, systemd's ExecReload=), replace itself in place (run_upgrade)."""

    def __init__(self, config: DaemonConfig, plan_upgrade: Optional[Callable[[Optional[List[str]]], Any]] = None,
                 inherited: Optional[dict] = None):
        self.config = config
        self.lock_handle = None
        self.file_limit: Optional[int] = None   # set by `web` once it has raised it
        # (new web options or None) -> (argv, environment) of the exec, or raises UpgradeRefused.
        self.plan_upgrade = plan_upgrade
        self.inherited = inherited or {}        # what the previous image handed over (take_inventory)

    def acquire_lock(self) -> None:
        """One daemon per home; the second names the first one's pid and exits. After an
        upgrade the lock is already ours: its descriptor was handed over."""
        path = os.path.join(self.config.home, "pmdaemon.lock")
        if self.inherited.get("lock") is not None:
            self.lock_handle = open(self.inherited["lock"], "r+")
            os.set_inheritable(self.lock_handle.fileno(), False)
            return
        handle = open(open_private(path, os.O_RDWR | os.O_CREAT), "r+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            other = handle.read().strip() or "unknown"
            handle.close()
            raise SystemExit("pmdaemon: another daemon (pid %s) is already running with home %s"
                             % (other, self.config.home))
        handle.seek(0)
        handle.truncate()
        handle.write("%d\n" % os.getpid())
        handle.flush()
        self.lock_handle = handle

    async def run(self) -> int:
        loop = asyncio.get_event_loop()
        stop = asyncio.Event()
        # SIGHUP too: a daemon started from a terminal that closes shuts down cleanly (children
        # stopped, state saved) instead of dying with its children orphaned.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(signum, stop.set)
        if self.config.tls is not None:             # SIGUSR1: re-read the certificate files
            loop.add_signal_handler(signal.SIGUSR1, self.config.tls.reload)
        upgrade = asyncio.Event()                   # SIGUSR2: upgrade in place
        loop.add_signal_handler(signal.SIGUSR2, upgrade.set)
        supervisor = Supervisor(self.config.home)
        if self.inherited.get("session"):           # run tokens stay those of the adopted runs
            supervisor.context.session = self.inherited["session"]
        api = Api(supervisor, AccessPolicy(self.config.api_key, self.config.allow_hosts,
                                           self.config.cors_origins, read_keys=self.config.read_keys))
        broadcaster = Broadcaster(supervisor)
        server = HttpServer(api, broadcaster, self.config)
        port = await server.bind(self.inherited.get("listeners"))
        api.policy.serve_origin("https" if self.config.tls else "http", port,
                                [sock.getsockname()[0] for sock in server.listeners])
        # The first sample after the port is bound and before children are restored: a /proc
        # that cannot be read degrades metrics, it can neither orphan children nor stop us.
        supervisor.metrics.sample()
        supervisor.file_limit, supervisor.fds_at_start = self.file_limit, len(os.listdir("/proc/self/fd"))
        await supervisor.restore(self.inherited.get("runs"))
        if len(supervisor.registry) > supervisor.process_room():
            log.warning("the file limit (%d descriptors) leaves room for about %d processes and %d are "
                        "managed: some may not start; raise it (ulimit -n, or LimitNOFILE= under systemd)",
                        self.file_limit, supervisor.process_room(), len(supervisor.registry))
        await server.start_serving()
        sampler = asyncio.ensure_future(supervisor.metrics.run(self.config.sample_interval))
        host = self.config.host if ":" not in self.config.host else "[%s]" % self.config.host
        where = "%s://%s:%d" % ("https" if self.config.tls else "http", host, port)
        print("pmdaemon %s listening on %s (home %s)" % (__version__, where, self.config.home), flush=True)
        notifier = SystemdNotifier()
        notifier.notify("READY=1\nMAINPID=%d\nSTATUS=serving on %s" % (os.getpid(), where))
        watchdog = asyncio.ensure_future(notifier.watchdog())
        if self.inherited:
            log.info("upgraded in place (pid %d): %d process(es) adopted", os.getpid(),
                     len(self.inherited.get("runs") or {}))
            self._upgrade_result({"id": self.inherited.get("request"), "upgraded": True, "pid": os.getpid()})
        while True:
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(upgrade.wait())]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()
            if stop.is_set():
                break
            upgrade.clear()
            log.info("upgrade asked for: checking the file on disk and the options")
            request = read_private_json(os.path.join(self.config.home, UPGRADE_REQUEST_NAME), remove=True) or {}
            try:
                if self.plan_upgrade is None:
                    raise UpgradeRefused("this daemon cannot upgrade itself")
                argv, environ = await loop.run_in_executor(None, self.plan_upgrade, request.get("web"))
            except UpgradeRefused as refusal:
                log.warning("upgrade refused: %s", refusal.message)
                self._upgrade_result({"id": request.get("id"), "upgraded": False, "reason": refusal.message})
                continue
            notifier.reloading()
            watchdog.cancel()
            sampler.cancel()
            await self._exec_upgrade(server, supervisor, argv, environ, request.get("id"))
            # Only if the exec failed: the runs are no longer followed, so they are stopped.
            log.error("the upgrade could not exec %s: shutting down", argv[0])
            break
        notifier.notify("STOPPING=1\nSTATUS=stopping children and saving state")
        watchdog.cancel()
        log.info("shutting down: stopping children and saving state")
        await server.close()
        sampler.cancel()
        await supervisor.shutdown()
        return 0

    async def _exec_upgrade(self, server: HttpServer, supervisor: Supervisor, argv: List[str],
                            environ: Dict[str, str], request_id: Any) -> None:
        """Hand the listening sockets, the runs and the lock over to a new image of this
        process (exec: same pid, so the children stay ours), described in the inventory file
        that UPGRADE_ENV names. Returns only if the exec failed."""
        began = time.monotonic()
        listeners = await server.hand_over()
        runs = await supervisor.hand_over()
        self.lock_handle.flush()
        os.set_inheritable(self.lock_handle.fileno(), True)
        nonce = os.urandom(16).hex()
        atomic_write(os.path.join(self.config.home, UPGRADE_INVENTORY_NAME), json_bytes(
            {"nonce": nonce, "lock": self.lock_handle.fileno(), "listeners": listeners, "request": request_id,
             "session": supervisor.context.session, "runs": {key: run for key, run in runs.items() if run}}))
        log.info("upgrading in place: %d process(es) handed over after %.0f ms; exec %s",
                 len(runs), (time.monotonic() - began) * 1000, " ".join(argv[1:3]))
        for handler in log.handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execve(argv[0], argv, dict(environ, **{UPGRADE_ENV: nonce}))
        except OSError as exc:
            log.error("exec failed: %s", exc)

    def _upgrade_result(self, result: dict) -> None:
        """What `upgrade` waits for: refused with the reason, or done (by the new image)."""
        with contextlib.suppress(OSError):
            atomic_write(os.path.join(self.config.home, UPGRADE_RESULT_NAME), json_bytes(result))



def is_loopback_bind(host: str) -> bool:
    """True when every address the name resolves to is a loopback one (a name is judged by
    where it points, not by how it is spelled); a name that does not resolve is not."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host.strip("[]"), None)}
    except (OSError, UnicodeError):
        return False
    return bool(addresses) and all(is_loopback_host(address.split("%")[0]) for address in addresses)


def scrub_environment(names=SECRET_ENV_NAMES) -> bool:
    """Take secrets out of our environment, also where /proc/PID/environ reads it: os.environ
    forgets a variable, but the bytes the kernel placed at exec (env_start..env_end in
    /proc/self/stat) stay, for anything that can read that file or an env_file linked to it.
    False when they could not be overwritten."""
    present = [name for name in names if name in os.environ]
    for name in present:
        del os.environ[name]                # unsetenv: the C environment forgets it too
    if not present:
        return True
    try:
        with open("/proc/self/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[47]), int(fields[48])       # fields 50 and 51 of proc(5)
        with open("/proc/self/mem", "r+b", buffering=0) as memory:
            memory.seek(start)
            entries = b"\0" + memory.read(end - start)     # each entry follows a NUL
            for name in present:
                at = entries.find(b"\0" + name.encode() + b"=")
                while at >= 0:
                    stop = entries.find(b"\0", at + 1)
                    stop = len(entries) if stop < 0 else stop
                    memory.seek(start + at)                  # entries[at + 1] is at start + at
                    memory.write(b"\0" * (stop - at - 1))
                    entries = entries[:at + 1] + b"\0" * (stop - at - 1) + entries[stop:]
                    at = entries.find(b"\0" + name.encode() + b"=", stop)
        return True
    except (OSError, IndexError, ValueError):
        return False


def forbid_inspection() -> bool:
    """prctl(PR_SET_DUMPABLE, 0): the daemon's /proc files (environ, mem, ...) become root's
    only, so a child running as the same user cannot read the API key from its parent's
    environment; no core dump holds it either. Children are dumpable again once they exec."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (ImportError, OSError, AttributeError):
        return False


def watch_children_by_pidfd(loop) -> None:
    """Learn of children's exits from a pidfd each in the event loop (PidfdWatcher), not from
    a thread per child blocked in waitpid: no thread to start in a restart, no stack per
    child, and one pidfd per managed process. Python 3.9+ where the kernel has pidfd_open
    (Linux 5.3). It is asyncio's watcher too (its children are the health checks') up to
    3.13; 3.12 deprecates choosing one, and 3.14 has no such choice: there it watches ours."""
    if not hasattr(os, "pidfd_open"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))  # novermin (3.9+: checked above)
    except OSError:
        return                              # an older kernel, or a sandbox that forbids it
    if not hasattr(asyncio, "set_child_watcher"):
        PidfdWatcher.installed = PidfdWatcher()
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # set_child_watcher takes only its subclasses (made here: the CLI never loads asyncio).
        watcher = type("PidfdWatcher", (PidfdWatcher, asyncio.AbstractChildWatcher), {})()
        asyncio.set_child_watcher(watcher)
    PidfdWatcher.installed = watcher


def raise_file_limit(wanted: int) -> Optional[int]:
    """Allow enough descriptors for the connection cap and the processes: the soft limit up to
    the hard limit, and as root the hard limit too (up to the kernel's fs.nr_open); the soft
    limit now, None when unlimited or unknown."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if os.geteuid() == 0 and hard != resource.RLIM_INFINITY and hard < wanted:
            with contextlib.suppress(OSError, ValueError):
                with open("/proc/sys/fs/nr_open") as handle:
                    hard = min(wanted, int(handle.read()))
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return None if soft == resource.RLIM_INFINITY else soft
    except (ImportError, ValueError, OSError):
        return None


class AcceptTrouble:
    """The event loop's exception handler: a listening socket that cannot accept (out of
    descriptors) is said once per episode, not with a traceback per try (asyncio retries it
    every second by itself); anything else goes to asyncio's default handler."""

    def __init__(self, quiet_after: float = ACCEPT_EPISODE_GAP):
        self.quiet_after = quiet_after
        self._last = -math.inf

    def handle(self, loop, context: dict) -> None:
        if self._retry_after_close(context):
            return
        if "out of system resource" not in context.get("message", ""):
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self._last > self.quiet_after:
            exc = context.get("exception")
            log.warning("cannot accept connections: %s; new connections wait in the backlog and "
                        "are accepted once descriptors are free (raise the file limit: ulimit -n, "
                        "LimitNOFILE=)", getattr(exc, "strerror", None) or exc)
        self._last = now

    @staticmethod
    def _retry_after_close(context: dict) -> bool:
        """asyncio's one-second retry of such an accept, still pending when the daemon closed the
        socket at shutdown: it finds the descriptor gone (-1). Nothing is wrong; nothing to say."""
        return (isinstance(context.get("exception"), ValueError) and "_start_serving" in repr(context.get("handle"))
                and "Invalid file descriptor: -1" in str(context.get("exception")))


class DaemonLogFile(logging.Handler):
    """pmdaemon.log, written like a process log (a LogFile): rotated, so it never fills the
    disk; 0600, never through a link; a failed write (a full disk) is dropped, stderr still
    has the line. (Not logging.handlers: half a MiB of imports for one file.)"""

    def __init__(self, path: str):
        super().__init__()
        self.file = LogFile(path, DEFAULT_LOG_MAX_SIZE, DEFAULT_LOG_MAX_FILES)
        self.file.write(b"")                # created now: an unusable file is known at start

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.file.write((self.format(record) + "\n").encode("utf-8", "replace"))


class StderrLog(logging.Handler):
    """The daemon's log on stderr, which must never stop the daemon: a line goes out only when
    the stream can take it at once. A pipe nobody reads (or a stopped terminal) loses lines
    there; pmdaemon.log keeps them all. (A blocking write would freeze every child's
    supervision until someone reads.)"""

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            descriptor = sys.stderr.fileno()
            # Writable means room for at least PIPE_BUF bytes: a line cut to that fits whole.
            if select.select([], [descriptor], [], 0)[1]:
                line = self.format(record).encode("utf-8", "replace")[:select.PIPE_BUF - 1]
                os.write(descriptor, line + b"\n")


def setup_logging(home: str, level: str, to_stderr: bool = True) -> None:
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    handlers: List[logging.Handler] = [StderrLog()] if to_stderr else []
    with contextlib.suppress(OSError):
        handlers.append(DaemonLogFile(os.path.join(home, "pmdaemon.log")))
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)
    log.setLevel(level.upper())


def source_path() -> str:
    """This file, also when the code runs from the code cache (code keeps its file's name)."""
    return os.path.abspath(source_path.__code__.co_filename)


def run_from_code_cache(home: str) -> None:
    """Replace this process by the same command run from a compiled copy of this file.

    Run as a script, the interpreter compiles all of pmdaemon.py at every start (scripts are
    never cached) and the allocator keeps the ~20 MiB compiling took for the life of the
    process: most of an idle daemon's memory. So `web` writes its code object once into the
    home (private to this user, like state.json, which decides what runs anyway) and
    executes that: pid, arguments, descriptors and environment stay. Returns when there is
    nothing to gain (imported: Python's own cache; already the cached code) or the cache
    cannot be written (the daemon then runs as it is)."""
    if globals().get("__spec__") is not None or globals().get("__file__", ".pyc").endswith(".pyc"):
        return
    path = os.path.join(home, CODE_CACHE_NAME)
    try:
        with open(source_path(), "rb") as handle:
            source = handle.read()
        header = code_cache_header(source, source_path())
        if _cached_header(path) != header:
            code = compile(source, source_path(), "exec", dont_inherit=True)
            atomic_write(path, header + marshal.dumps(code))
    except (OSError, ValueError, SyntaxError):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    with contextlib.suppress(OSError):      # no usable sys.executable: run as we are
        os.execv(sys.executable, [sys.executable] + subprocess._args_from_interpreter_flags() + [path] + sys.argv[1:])


def code_cache_header(source: bytes, source_file: str) -> bytes:
    """The header of a code cache: the magic number (3.7+: 4 bytes of flags, 0b11 as PEP 552's
    "hash-based, checked"), then 8 bytes of a digest of the source, its absolute path and the
    interpreter. Python skips the header when it runs a .pyc, so the key is ours: a cache made
    from another copy of the file (whose sys.path[0] would be another directory) or by another
    interpreter is never taken for this one."""
    flags = struct.pack("<I", 0b11) if sys.version_info >= (3, 7) else b""
    key = hashlib.sha256(b"\0".join([source_file.encode("utf-8", "surrogateescape"),
                                     sys.executable.encode("utf-8", "surrogateescape"),
                                     sys.version.encode(), source]))
    return importlib.util.MAGIC_NUMBER + flags + key.digest()[:8]


def _cached_header(path: str) -> bytes:
    """The header of our code cache: a private, plain file of this user, or nothing."""
    try:
        descriptor = open_private(path, os.O_RDONLY)
    except OSError:
        return b""
    with open(descriptor, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat_module.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            return b""
        return handle.read(len(importlib.util.MAGIC_NUMBER) + 12 if sys.version_info >= (3, 7) else 12)


# Run by the interpreter an upgrade will exec, the new source on its stdin: its version on a
# line, then the compiled code (marshal), or the reason it does not compile on stderr. (In a
# process of its own: compile() holds the GIL, and the daemon would stop answering meanwhile.)
UPGRADE_PROBE = "\n".join([
    "import marshal, sys",
    "sys.stdout.buffer.write(b'%d.%d.%d\\n' % sys.version_info[:3]); sys.stdout.flush()",
    "try:",
    "    code = compile(sys.stdin.buffer.read(), sys.argv[1], 'exec', dont_inherit=True)",
    "except (SyntaxError, ValueError) as exc:",
    "    sys.exit('%s (line %s)' % (exc.msg, exc.lineno) if isinstance(exc, SyntaxError) else str(exc))",
    "sys.stdout.buffer.write(marshal.dumps(code))"])


def plan_upgrade(home: str, api_key: Optional[str], options: Optional[List[str]]) -> Tuple[List[str], Dict[str, str]]:
    """The exec of an upgrade, checked first: the pmdaemon.py now on disk must compile, know
    how to adopt running processes, and run under the interpreter we would exec (3.6+);
    new `web` options (None: the same) must parse. Writes the code cache of the new file.
    Returns (argv, environment); raises UpgradeRefused with the reason."""
    web = list(sys.argv[1:])
    if options is not None:
        if not isinstance(options, list) or not all(isinstance(option, str) for option in options):
            raise UpgradeRefused("the new web options must be a list of strings")
        web = ["web", "--home", home] + (["--quiet"] if "--quiet" in web else []) + options
        said: List[str] = []
        writer = type("Said", (), {"write": lambda self, text: said.append(text), "flush": lambda self: None})()
        try:
            with contextlib.redirect_stderr(writer):
                parsed = build_parser().parse_args(web)
        except SystemExit:
            raise UpgradeRefused("bad web options: %s" % "".join(said).strip().splitlines()[-1]) from None
        if parsed.daemonize:
            raise UpgradeRefused("--daemonize does not go with an upgrade (the daemon stays where it runs)")
    path = source_path()
    try:
        with open(path, "rb") as handle:
            source = handle.read()
    except OSError as exc:
        raise UpgradeRefused("cannot read %s: %s" % (path, exc.strerror or exc)) from None
    if UPGRADE_ENV.encode() not in source:
        raise UpgradeRefused("%s cannot adopt running processes (it predates upgrades): restart the "
                             "daemon instead" % path)
    try:
        probe = subprocess.run([sys.executable, "-c", UPGRADE_PROBE, path], input=source,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise UpgradeRefused("cannot run %s: %s" % (sys.executable, exc)) from None
    said, _, code = probe.stdout.partition(b"\n")
    version = tuple(int(part) for part in said.split(b".")) if re.match(rb"^\d+\.\d+\.\d+$", said) else ()
    if version < (3, 6):
        raise UpgradeRefused("%s is Python %s; pmdaemon.py needs 3.6 or newer"
                             % (sys.executable, said.decode("ascii", "replace") or "of an unknown version"))
    if probe.returncode:
        lines = probe.stderr.decode("utf-8", "replace").strip().splitlines()
        raise UpgradeRefused("%s does not compile%s: %s" % (
            path, "" if version == tuple(sys.version_info[:3]) else " under %s" % sys.executable,
            lines[-1] if lines else "exit status %d" % probe.returncode))
    run = [path]
    if version == tuple(sys.version_info[:3]):  # the same interpreter: run from a fresh code cache
        cache = os.path.join(home, CODE_CACHE_NAME)
        with contextlib.suppress(OSError):
            atomic_write(cache, code_cache_header(source, path) + code)
            run = [cache]
    environ = dict(os.environ)
    if api_key and not {"--api-key", "--api-key-file"} & set(web):
        environ[API_KEY_ENV] = api_key          # it came from there, and was scrubbed (the new image does too)
    return [sys.executable] + subprocess._args_from_interpreter_flags() + run + web[:], environ


def web_argv(args: argparse.Namespace, with_key: bool = True) -> List[str]:
    """The options of a parsed `web` command line, for the same daemon run in the background
    (with_key=False: what may be written down; --api-key never is)."""
    argv = ["--port", str(args.port), "--host", args.host, "--log-level", args.log_level]
    for flag, *_ in WEB_NUMBER_OPTIONS:
        argv += [flag, str(getattr(args, flag[2:].replace("-", "_")))]
    for flag, values in (("--allow-host", args.allow_host), ("--cors-origin", args.cors_origin)):
        for value in values:
            argv += [flag, value]
    if getattr(args, "api_key_file", None):
        argv += ["--api-key-file", os.path.abspath(args.api_key_file)]
    for path in args.read_key_file:
        argv += ["--read-key-file", os.path.abspath(path)]
    if args.tls_cert:
        argv += ["--tls-cert", os.path.abspath(args.tls_cert), "--tls-key", os.path.abspath(args.tls_key)]
    if args.api_key and with_key:
        argv += ["--api-key", args.api_key]
    return argv


def record_web_options(home: str, argv: List[str]) -> None:
    """Write down the options this home's daemon runs with: the CLI's auto-start and `startup`
    bring back the same daemon (its port, host, key and TLS files), not the defaults."""
    atomic_write(os.path.join(home, OPTIONS_NAME), json_bytes({"web": argv}))


def recorded_web_options(home: str) -> List[str]:
    """The options the home's daemon last ran with; [] when none were recorded (or the file is
    not a private, plain file of ours)."""
    try:
        descriptor = open_private(os.path.join(home, OPTIONS_NAME), os.O_RDONLY)
    except OSError:
        return []
    with open(descriptor, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat_module.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            return []
        try:
            argv = json.loads(handle.read(MAX_BODY_BYTES).decode("utf-8")).get("web")
        except (ValueError, AttributeError):
            return []
    return argv if isinstance(argv, list) and all(isinstance(part, str) for part in argv) else []


def resolve_api_key(args: argparse.Namespace) -> Optional[str]:
    if getattr(args, "api_key_file", None):
        with open(args.api_key_file, encoding="utf-8") as handle:
            return handle.read().strip() or None
    return args.api_key or os.environ.get(API_KEY_ENV) or None


def read_key_files(paths: List[str]) -> Tuple[str, ...]:
    keys = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            key = handle.read().strip()
        if not key:
            raise OSError("%s is empty" % path)
        keys.append(key)
    return tuple(keys)


def warn_if_clear_text(api_key: Optional[str], tls: Optional[TlsFiles], host: str) -> None:
    if api_key and not tls and not is_loopback_bind(host):
        print("pmdaemon: warning: %s is not loopback and there is no TLS: the key and everything "
              "else cross the network in clear text (use --tls-cert/--tls-key)" % host, file=sys.stderr)


def command_web(args: argparse.Namespace) -> int:
    try:
        api_key = resolve_api_key(args)
        read_keys = read_key_files(args.read_key_file)
    except OSError as exc:
        print("pmdaemon: cannot read a key file: %s" % exc, file=sys.stderr)
        return 2
    if bool(args.tls_cert) != bool(args.tls_key):
        print("pmdaemon: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    try:
        tls = TlsFiles(args.tls_cert, args.tls_key) if args.tls_cert else None
    except (OSError, ValueError) as exc:
        print("pmdaemon: cannot use the TLS files: %s" % exc, file=sys.stderr)
        return 2
    if read_keys and not api_key:
        print("pmdaemon: --read-key-file needs an API key too (without one, access is by user, "
              "not by key)", file=sys.stderr)
        return 2
    if not api_key and not is_loopback_bind(args.host):
        print("pmdaemon: refusing to listen on %s without an API key: anyone who can reach it "
              "could run programs as this user. Set --api-key, --api-key-file or %s, or use "
              "--host 127.0.0.1." % (args.host, API_KEY_ENV), file=sys.stderr)
        return 2
    home = client_home(args)
    if args.daemonize:
        warn_if_clear_text(api_key, tls, args.host)
        pid = start_background_daemon(home, web_argv(args))
        print("pmdaemon: daemon running in the background (pid %d, home %s)" % (pid, home))
        return 0
    config = DaemonConfig(host=args.host, port=args.port, api_key=api_key, read_keys=read_keys, home=home, tls=tls,
                          allow_hosts=tuple(args.allow_host), cors_origins=tuple(args.cors_origin),
                          sample_interval=args.sample_interval, max_connections=args.max_connections,
                          max_ws_clients=args.max_ws_clients, ws_ping_interval=args.ws_ping_interval,
                          ws_pong_timeout=args.ws_pong_timeout, ws_slow_grace=args.ws_slow_grace,
                          header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                          keepalive_timeout=args.keepalive_timeout, max_body_memory=args.max_body_memory)
    daemon = Daemon(config, functools.partial(plan_upgrade, home, api_key))
    try:
        secure_home(home)
        run_from_code_cache(home)       # returns only where it cannot re-execute
        daemon.inherited = take_inventory(home)
        daemon.acquire_lock()
        record_web_options(home, web_argv(args, with_key=False))
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 1
    except HomeError as exc:
        print("pmdaemon: refusing to use %s as the home: %s" % (home, exc), file=sys.stderr)
        return 1
    except OSError as exc:
        print("pmdaemon: cannot use %s as the home directory: %s" % (home, exc.strerror or exc),
              file=sys.stderr)
        return 1
    warn_if_clear_text(api_key, tls, args.host)    # said here: once, after the re-execution
    setup_logging(home, args.log_level, to_stderr=not args.quiet)
    if not scrub_environment():
        log.warning("the API key could not be wiped from /proc/%d/environ; prefer --api-key-file "
                    "to $%s" % (os.getpid(), API_KEY_ENV))
    if not forbid_inspection():
        log.warning("prctl(PR_SET_DUMPABLE) is not available: children of this user could read "
                    "the daemon's environment; prefer --api-key-file to $%s" % API_KEY_ENV)
    # Connections, and per managed process: 3 pipes, a pidfd, 2 log files, a held stat file.
    daemon.file_limit = raise_file_limit(config.max_connections + FDS_PER_PROCESS * MAX_PROCESSES + 1024)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.set_exception_handler(AcceptTrouble().handle)
    watch_children_by_pidfd(loop)
    try:
        return loop.run_until_complete(daemon.run())
    except OSError as exc:
        print("pmdaemon: cannot listen on %s:%d: %s" % (args.host, args.port, exc.strerror or exc),
              file=sys.stderr)
        return 1
    finally:
        loop.close()


# -- the daemon in the background: is one running, start one -------------------------------------

class CliError(PMDaemonError):
    """Ends a command with a one-line message on stderr and an exit status (1: refused/failed)."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def running_daemon(home: str) -> Optional[int]:
    """The pid of the daemon that holds the home's lock and answers on its socket, if any."""
    pid = None
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(home, "pmdaemon.lock")) as handle:
            pid = int(handle.read().strip() or 0)
    if not pid:
        return None
    try:
        with socket.socket(socket.AF_UNIX) as probe:
            probe.settimeout(1)
            probe.connect(os.path.join(home, SOCKET_NAME))
    except OSError:
        return None
    return pid


def start_background_daemon(home: str, web_args: List[str]) -> int:
    """Run `pmdaemon.py web` detached (own session, output to the home), wait until its socket
    answers; its pid. A daemon that is already running for the home is fine too."""
    try:
        secure_home(home)
    except (HomeError, OSError) as exc:
        raise CliError("refusing to use %s as the home: %s" % (home, exc)) from None
    running = running_daemon(home)
    if running:
        return running
    out_path = os.path.join(home, "daemon.out")
    output = open_private(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        child = subprocess.Popen([sys.executable, source_path(), "web", "--home", home, "--quiet"]
                                 + web_args, stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                                 start_new_session=True, close_fds=True, cwd="/")
    finally:
        os.close(output)
    deadline = time.monotonic() + BACKGROUND_START_TIMEOUT
    while time.monotonic() < deadline:
        if child.poll() is not None:
            running = running_daemon(home)
            if running:                         # another one won the lock meanwhile: use it
                return running
            with open(out_path, errors="replace") as handle:
                said = handle.read().strip().splitlines()
            raise CliError("the daemon did not start: %s" % (said[-1] if said else "exit %d" % child.returncode))
        if running_daemon(home) == child.pid:
            return child.pid
        time.sleep(0.02)
    raise CliError("the daemon did not answer within %d s (see %s)" % (BACKGROUND_START_TIMEOUT, out_path))


# ==============================================================================================
# 12. CLI
#     Every verb but `web` is a client of the daemon's API (the home's Unix socket, or a URL),
#     which starts a local daemon when none answers. Nothing above calls into this section.
#     main(argv) returns the exit status: 0 done, 1 refused or failed, 2 usage.
# ==============================================================================================

# -- talking to the daemon ------------------------------------------------------------------

def parse_response(data: bytes) -> Tuple[int, bytes]:
    """(status, body) of a whole HTTP/1.1 response read until the server closed. The CLI's
    own few lines: http.client costs more start-up than everything else a command imports."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    match = re.match(rb"HTTP/1\.[01] ([0-9]{3}) ", lines[0] + b" ")
    if not match:
        raise CliError("the daemon sent something that is not HTTP: %r" % lines[0][:60])
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            body = body[:int(value)]
    return int(match.group(1)), body


def client_home(args: argparse.Namespace) -> str:
    return os.path.abspath(os.path.expanduser(getattr(args, "home", None) or os.environ.get(HOME_ENV)
                                              or DEFAULT_HOME))


class Client:
    """The CLI's link to a daemon: the home's Unix socket, or a URL; the key from
    --api-key-file or $PMDAEMON_API_KEY. A local daemon is started when none answers."""

    def __init__(self, args: argparse.Namespace):
        self.home = client_home(args)
        self.url = getattr(args, "url", None) or os.environ.get(URL_ENV)
        self.socket_path = os.path.join(self.home, SOCKET_NAME)
        self.timeout = getattr(args, "timeout", None) or CLI_TIMEOUT
        self.may_start = not self.url and not getattr(args, "no_daemon", False)
        self.key = self._key(getattr(args, "api_key_file", None))
        self._started = False

    @staticmethod
    def _key(path: Optional[str]) -> Optional[str]:
        if path:
            try:
                with open(path, encoding="utf-8") as handle:
                    return handle.read().strip() or None
            except OSError as exc:
                raise CliError("cannot read --api-key-file %s: %s" % (path, exc.strerror or exc), 2) from None
        return os.environ.get(API_KEY_ENV) or None

    @property
    def address(self) -> str:
        return self.url or "unix:" + self.socket_path

    def connect(self, timeout: Optional[float]) -> socket.socket:
        """A socket to the daemon: its Unix socket, or the URL's host (TLS for https)."""
        if not self.url:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(self.socket_path)
            except OSError:
                sock.close()
                raise
            return sock
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CliError("--url must look like http://HOST:PORT, got %r" % self.url, 2)
        sock = socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                        timeout=timeout)
        if parts.scheme == "https":
            import ssl
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
        return sock

    def headers(self) -> Dict[str, str]:
        headers = {"Host": "localhost"} if not self.url else {}
        if self.key:
            headers["Authorization"] = "Bearer " + self.key
        return headers

    def open(self, method: str, path: str, body: Any = None, timeout: Optional[float] = None) -> Tuple[int, bytes]:
        """Send one request; (status, body). Starts a local daemon if none answers."""
        try:
            return self._send(method, path, body, timeout)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if not self.may_start or self._started:
                raise CliError("cannot reach the daemon at %s: %s; start one with `pmdaemon.py web`"
                               % (self.address, exc.strerror or exc)) from None
        self.start_daemon()
        return self._send(method, path, body, timeout)

    def _send(self, method: str, path: str, body: Any, timeout: Optional[float]) -> Tuple[int, bytes]:
        base = urllib.parse.urlsplit(self.url).path.rstrip("/") if self.url else ""
        headers = dict(self.headers(), Connection="close")
        if self.url:
            headers["Host"] = urllib.parse.urlsplit(self.url).netloc
        data = json_bytes(body) if body is not None else b""
        if body is not None:
            headers["Content-Type"] = "application/json"
        headers["Content-Length"] = str(len(data))
        request = ("%s %s HTTP/1.1\r\n%s\r\n" % (method, base + path, "".join(
            "%s: %s\r\n" % item for item in headers.items()))).encode("latin-1") + data
        try:
            with self.connect(timeout or self.timeout) as sock:
                sock.sendall(request)
                chunks = []
                while True:
                    chunk = sock.recv(262144)
                    if not chunk:
                        break
                    chunks.append(chunk)
            return parse_response(b"".join(chunks))
        except socket.timeout:
            raise CliError("the daemon did not answer within %g s; the action may still be under way "
                           "(see `pmdaemon.py ls`)" % (timeout or self.timeout)) from None
        except (FileNotFoundError, ConnectionRefusedError):
            raise
        except OSError as exc:
            raise CliError("cannot reach the daemon at %s: %s" % (self.address, exc.strerror or exc)) from None

    def call(self, method: str, path: str, body: Any = None, timeout: Optional[float] = None) -> Tuple[int, Any]:
        status, raw = self.open(method, path, body, timeout)
        try:
            return status, json.loads(raw or b"null")
        except ValueError:
            return status, None

    def ok(self, method: str, path: str, body: Any = None, timeout: Optional[float] = None) -> Any:
        """The body of a 2xx answer; a CliError with the daemon's message otherwise."""
        status, answer = self.call(method, path, body, timeout)
        if status >= 300:
            raise CliError(error_text(answer, status))
        return answer

    def start_daemon(self) -> None:
        """Start `web` in the background for this home (like PM2) and wait until it answers."""
        pid = start_background_daemon(self.home, recorded_web_options(self.home))
        self._started = True
        print("pmdaemon: started a daemon in the background (pid %d, home %s)" % (pid, self.home),
              file=sys.stderr)


def error_text(answer: Any, status: int) -> str:
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        return "%s (%s)" % (answer["error"].get("message"), answer["error"].get("code"))
    return "the daemon answered HTTP %d" % status


# -- showing things ---------------------------------------------------------------------------

STATUS_COLOURS = {"online": "32", "starting": "33", "restarting": "33", "stopping": "33",
                  "stopped": "90", "errored": "31", "healthy": "32", "unhealthy": "31"}


def colour(text: str, key: str, enabled: bool) -> str:
    code = STATUS_COLOURS.get(key)
    return "\x1b[%sm%s\x1b[0m" % (code, text) if enabled and code else text


def human_duration(milliseconds: int) -> str:
    seconds = milliseconds // 1000
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return "%d%s" % (seconds // size, unit)
    return "%ds" % seconds


def human_bytes(count: int) -> str:
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if count >= size:
            return "%.1f%s" % (count / size, unit)
    return "%dB" % count


def process_rows(processes: List[dict]) -> List[List[str]]:
    return [[str(p["id"]), p["name"], p["status"], str(p["pid"] or "-"), str(p["port"] or "-"),
             "%.1f%%" % p["cpu"], human_bytes(p["memory"]), human_duration(p["uptime"]),
             str(p["restarts"]), p.get("health", "none")] for p in processes]


TABLE_COLUMNS = ("id", "name", "status", "pid", "port", "cpu", "mem", "uptime", "restarts", "health")


def format_table(processes: List[dict], colours: bool) -> List[str]:
    """The `ls` table, like `pm2 ls`; colours only for a terminal."""
    rows = process_rows(processes)
    widths = [max([len(column)] + [len(row[i]) for row in rows]) for i, column in enumerate(TABLE_COLUMNS)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(TABLE_COLUMNS, widths)).rstrip()]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        cells[2] = colour(cells[2], row[2], colours)
        cells[9] = colour(cells[9], row[9], colours)
        lines.append("  ".join(cells).rstrip())
    return lines


def print_log_entry(entry: dict, prefix: str = "", flush: bool = False) -> None:
    """One log line; on a terminal, control sequences from the child are shown, not obeyed."""
    text = "%s%s %s %s" % (prefix, entry["timestamp"], entry["type"], entry["message"])
    if sys.stdout.isatty():
        text = TERMINAL_CONTROL_RE.sub(lambda match: repr(match.group())[1:-1], text)
    print(text, flush=flush)


def print_fields(fields: List[Tuple[str, Any]]) -> None:
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        print("%s  %s" % (name.ljust(width), "-" if value is None or value == "" else value))


# -- the WebSocket client of `logs --follow` and `monit` -----------------------------------------

class WsClient:
    """A blocking WebSocket client on a socket of the Client's; the frames are WsProtocol's."""

    def __init__(self, client: Client):
        raw = client.connect(10)
        self.sock = raw
        host = urllib.parse.urlsplit(client.url).netloc if client.url else "localhost"
        request, key = client_handshake("/ws", host, client.headers())
        raw.sendall(request)
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            chunk = raw.recv(65536)
            if not chunk:
                raise CliError("the daemon closed the WebSocket handshake")
            buffer += chunk
        head, _, rest = buffer.partition(b"\r\n\r\n")
        try:
            status = check_handshake_reply(head, key)
        except WebSocketError as error:
            raise CliError("the daemon's WebSocket handshake is wrong: %s" % error)
        if status != 101:
            raise CliError("the daemon refused the WebSocket: %s" % head.split(b"\r\n")[0].decode("latin-1"))
        self.protocol = WsProtocol(client=True)
        self.pending = self.protocol.receive_data(rest)     # frames that came with the 101
        self.close_code: Optional[int] = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def send_json(self, value: Any) -> None:
        self.sock.sendall(self.protocol.frame(Opcode.TEXT, json_bytes(value)))

    def messages(self) -> List[dict]:
        """Read what is there (the socket is readable) and return the JSON messages in it."""
        chunk = self.sock.recv(262144)
        if not chunk:
            raise EOFError("the daemon closed the connection")
        events, self.pending = self.pending + self.protocol.receive_data(chunk), []
        if self.protocol.outgoing:              # pongs
            self.sock.sendall(b"".join(self.protocol.outgoing))
            self.protocol.outgoing.clear()
        found = []
        for event in events:
            if event.kind == "text":
                found.append(json.loads(event.data))
            elif event.kind in ("close", "error"):
                self.close_code = event.data[0] if event.kind == "close" else None
                raise EOFError("the daemon closed the connection")
        return found

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(self.protocol.close(1000))
        self.sock.close()


# -- the verbs ------------------------------------------------------------------------------------

def quoted(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def all_processes(client: Client) -> List[dict]:
    return client.ok("GET", "/api/processes")["processes"]


def targets(client: Client, name: str) -> List[str]:
    """What a verb acts on: the name given, or for `all` every process by its own name."""
    return [entry["name"] for entry in all_processes(client)] if name == "all" else [name]


def group_names(client: Client) -> List[str]:
    """Every group (or single process) once, by the name it was created with."""
    names: List[str] = []
    for entry in all_processes(client):
        base = client.ok("GET", "/api/processes/" + quoted(entry["name"]))["config"]["name"]
        if base not in names:
            names.append(base)
    return names


INTERPRETERS = {".py": lambda: sys.executable, ".sh": lambda: "/bin/sh", ".js": lambda: shutil.which("node")}


def script_and_args(script: str, args: List[str], cwd: str) -> Tuple[str, List[str], Optional[str]]:
    """A file that is not executable runs through its interpreter, chosen by extension (like
    PM2): .py the running Python, .sh sh, .js node. Returns (script, args, interpreter)."""
    path = os.path.join(cwd, script)
    if "/" not in script and not os.path.isfile(path):
        return script, args, None                   # a command on PATH
    if not os.path.isfile(path) or os.access(path, os.X_OK):
        return script, args, None
    find = INTERPRETERS.get(os.path.splitext(script)[1].lower())
    interpreter = find() if find else None
    if interpreter is None:
        return script, args, None                   # the daemon says what is wrong with it
    return interpreter, [os.path.abspath(path)] + list(args), interpreter


def parse_env_options(items: List[str]) -> Dict[str, str]:
    env = {}
    for item in items or ():
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise CliError("-e/--env needs KEY=VALUE, got %r" % item, 2)
        env[key] = value
    return env


def is_apps_file(target: str) -> bool:
    """What `start` takes as a file of apps rather than a program, as PM2 decides it: .json,
    .yml/.yaml, .toml, *.config.js/.cjs/.mjs, ecosystem*.js, and supervisord's .conf/.ini."""
    base = os.path.basename(target).lower()
    return os.path.isfile(target) and (base.endswith((".json", ".json5", ".yml", ".yaml", ".toml", ".conf", ".ini"))
                                       or re.search(r"(\.config|^ecosystem[^/]*)\.[cm]?js\Z", base) is not None)


def start_options(args: argparse.Namespace) -> dict:
    """The settings `start` flags give (PM2's names where PM2 has the flag)."""
    options = {key: value for key, value in (
        ("port", args.port), ("max_memory_restart", args.max_memory), ("wait_ready", args.wait_ready or None),
        ("cron_restart", args.cron), ("namespace", args.namespace), ("user", args.user),
        ("interpreter", args.interpreter), ("autorestart", False if args.no_autorestart else None),
        ("watch", [args.watch] if isinstance(args.watch, str) else True if args.watch else None),
        ("out_file", os.path.abspath(args.output) if args.output else None),
        ("error_file", os.path.abspath(args.error) if args.error else None)) if value is not None}
    if args.instances is not None:
        warnings: List[str] = []
        options["instances"] = pm2_instances(args.instances, warnings, "-i")
        if not _is_int(options["instances"]):
            raise CliError("-i takes a number, max, 0 or -1, got %r" % args.instances, 2)
    if args.health_url:
        options["health_check"] = {"type": "http", "url": args.health_url}
    return options


def verb_start(client: Client, args: argparse.Namespace) -> int:
    target = args.target
    if is_apps_file(target):
        args.file, args.prune = target, False
        if not args.env_name and args.env and len(args.env) == 1 and "=" not in args.env[0]:
            args.env_name = args.env[0]         # pm2 start ecosystem.config.js --env production
        return verb_apply(client, args)
    options = start_options(args)
    env = parse_env_options(args.env)
    existing = client.call("GET", "/api/processes/" + quoted(args.name or target))
    if existing[0] == 200 and args.name in (None, target) and not (options or env or args.script_args or args.cwd):
        answer = client.call("POST", "/api/processes/%s/start" % quoted(args.name or target), timeout=ACTION_TIMEOUT)
        if answer[0] == 409 and answer[1]["error"]["code"] == "PROCESS_ALREADY_RUNNING":
            return report(args, (200, {"success": True, "message": "%s: already running" % (args.name or target)}), None)
        return report(args, answer, "%s: started" % (args.name or target))
    cwd = os.path.abspath(args.cwd or os.getcwd())
    if args.interpreter:
        script, script_args, interpreter = target, list(args.script_args), None
    else:
        script, script_args, interpreter = script_and_args(target, args.script_args, cwd)
    name = args.name or re.sub(r"[^A-Za-z0-9._-]", "-", os.path.splitext(os.path.basename(target))[0])[:64]
    config = dict(options, name=name, script=script, args=script_args, cwd=cwd)
    if env:
        config["env"] = env
    if interpreter and not args.json:
        print("%s: running %s with %s" % (name, target, interpreter))
    found = client.call("GET", "/api/processes/" + quoted(name))
    if found[0] == 200:
        old = found[1]["config"] if "config" in found[1] else found[1]["processes"][0]["config"]
        program = [script] + script_args[:1 if interpreter else 0]     # the file a rewritten .py runs
        if ([old["script"]] + old["args"][:len(program) - 1], old.get("interpreter")) != \
                (program, config.get("interpreter")) and not args.force:
            raise CliError("%s already runs %s; use another --name, or --force to replace its program"
                           % (name, " ".join(shlex.quote(part) for part in [old["script"]] + old["args"])))
        answer = client.call("PATCH", "/api/processes/" + quoted(name), config, timeout=ACTION_TIMEOUT)
        if answer[0] == 200 and answer[1]["applied"] in ("unchanged", "saved"):
            answer = client.call("POST", "/api/processes/%s/start" % quoted(name), timeout=ACTION_TIMEOUT)
            if answer[0] == 409:
                return report(args, (200, {"success": True, "message": "%s: already running, unchanged" % name}), None)
        return report(args, answer, "%s: updated" % name)
    return report(args, client.call("POST", "/api/processes", config, timeout=ACTION_TIMEOUT), None)


def report(args: argparse.Namespace, answer: Tuple[int, Any], text: Optional[str]) -> int:
    """Print the outcome of an action; 1 when it failed (a created process that cannot run, too)."""
    status, body = answer
    if getattr(args, "json", False):
        print(json.dumps(body, indent=2))
    errored = isinstance(body, dict) and (body.get("process") or {}).get("status") == "errored"
    if status >= 300 or errored:
        if not getattr(args, "json", False):
            print("pmdaemon: %s" % (body["message"] if errored else error_text(body, status)), file=sys.stderr)
        return 1
    if not getattr(args, "json", False):
        print(text or body.get("message"))
    return 0


ACTIONS = {"stop": ("POST", "/api/processes/%s/stop", "stopped"),
           "restart": ("POST", "/api/processes/%s/restart", "restarted"),
           "reload": ("POST", "/api/processes/%s/reload", "reloaded"),
           "delete": ("DELETE", "/api/processes/%s", "deleted")}


def verb_action(client: Client, args: argparse.Namespace) -> int:
    method, path, done = ACTIONS[args.verb]
    failed = 0
    names = targets(client, args.target)
    if not names:
        print("no processes")
    for name in names:
        status, body = client.call(method, path % quoted(name), timeout=ACTION_TIMEOUT)
        if status >= 300:
            failed += 1
            print("pmdaemon: %s: %s" % (name, error_text(body, status)), file=sys.stderr)
            if args.json:
                print(json.dumps(body))
        elif args.json:
            print(json.dumps(body))
        else:
            print("%s: %s" % (name, "not running" if "was not running" in body["message"] else done))
    return 1 if failed else 0


def verb_signal(client: Client, args: argparse.Namespace) -> int:
    """`signal SIGUSR2 NAME` (pm2 sendSignal, supervisorctl signal): to every copy of NAME, or all."""
    try:
        signal_name = signal.Signals(parse_any_signal(_number_text(args.signal))).name
    except PMDaemonError as exc:
        raise CliError(exc.message, 2) from None
    failed = 0
    for name in targets(client, args.target):
        answer = client.call("POST", "/api/processes/%s/signal" % quoted(name), {"signal": signal_name})
        failed += report(args, answer, "%s: sent %s" % (name, signal_name))
    return 1 if failed else 0


def verb_send(client: Client, args: argparse.Namespace) -> int:
    """`send NAME [TEXT...]`: a line to the process's stdin; without TEXT, what our stdin holds."""
    data = " ".join(args.text) + "\n" if args.text else sys.stdin.read()
    if not data:
        raise CliError("nothing to send: give TEXT or pipe it in", 2)
    failed = 0
    encoded = data.encode("utf-8")
    for offset in range(0, len(encoded), MAX_STDIN_WRITE):
        chunk = encoded[offset:offset + MAX_STDIN_WRITE].decode("utf-8", "ignore")
        failed = report(args, client.call("POST", "/api/processes/%s/stdin" % quoted(args.name), {"data": chunk}),
                        None)
        if failed:
            break
    return failed


def verb_describe(client: Client, args: argparse.Namespace) -> int:
    """`info` and then every setting, default or not (pm2 describe)."""
    code = verb_info(client, args)
    if args.json:
        return code
    body = client.ok("GET", "/api/processes/" + quoted(args.name))
    config = body["config"] if "config" in body else body["processes"][0]["config"]
    print()
    print_fields([(key, json.dumps(value) if not isinstance(value, str) else value)
                  for key, value in sorted(config.items())])
    return code


def verb_scale(client: Client, args: argparse.Namespace) -> int:
    return report(args, client.call("PATCH", "/api/processes/" + quoted(args.name), {"instances": args.count},
                                    timeout=ACTION_TIMEOUT), None)


def verb_list(client: Client, args: argparse.Namespace) -> int:
    body = client.ok("GET", "/api/processes")
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        print("\n".join(format_table(body["processes"], sys.stdout.isatty())))
    return 0


def verb_info(client: Client, args: argparse.Namespace) -> int:
    body = client.ok("GET", "/api/processes/" + quoted(args.name))
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    for index, entry in enumerate(body.get("processes", [body])):
        if index:
            print()
        config = entry["config"]
        command = " ".join(shlex.quote(part) for part in [config["script"]] + config["args"])
        exit_info = entry["last_exit"] and "code %s, signal %s, after %s, at %s" % (
            entry["last_exit"]["code"], entry["last_exit"]["signal"],
            human_duration(entry["last_exit"]["uptime"]), entry["last_exit"]["at"])
        print_fields([("name", entry["name"]), ("id", entry["id"]), ("status", entry["status"]),
                      ("pid", entry["pid"]), ("port", entry["port"]), ("command", command),
                      ("cwd", config["cwd"]), ("uptime", human_duration(entry["uptime"])),
                      ("started at", entry["started_at"]), ("restarts", entry["restarts"]),
                      ("cpu", "%.1f%%" % entry["cpu"]), ("memory", human_bytes(entry["memory"])),
                      ("health", entry["health"]), ("last exit", exit_info), ("error", entry["error"]),
                      ("next restart", entry["next_restart_at"]),
                      ("waiting for", ", ".join(entry["waiting_for"])),
                      ("stdout log", entry["log_files"]["stdout"]), ("stderr log", entry["log_files"]["stderr"])])
    return 0


def verb_system(client: Client, args: argparse.Namespace) -> int:
    body = client.ok("GET", "/api/system")
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    memory, load = body["memory"], body["load"]
    print_fields([("cpu", "%.1f%% of %d cores" % (body["cpu"]["usage"], body["cpu"]["cores"])),
                  ("memory", "%s used of %s (%.1f%%), %s available" % (
                      human_bytes(memory["used"]), human_bytes(memory["total"]), memory["usage_percent"],
                      human_bytes(memory["available"]))),
                  ("load", "%.2f %.2f %.2f" % (load["one"], load["five"], load["fifteen"])),
                  ("uptime", human_duration(body["uptime"] * 1000)), ("at", body["timestamp"])])
    return 0


def verb_logs(client: Client, args: argparse.Namespace) -> int:
    wanted_type = "stderr" if args.err else "stdout" if args.out else "all"
    names = [args.name] if args.name else [entry["name"] for entry in all_processes(client)]
    prefix_all = not args.name or len(names) > 1
    stream = None
    if args.follow:                  # subscribe first: no line falls between backlog and stream
        stream = WsClient(client)
        stream.send_json({"type": "filter", "types": ["log", "subscribed", "error"], "processes": None})
        stream.send_json({"type": "subscribe", "channel": "logs", "process": args.name or "*"})
    backlog = []
    for name in names:
        body = client.ok("GET", "/api/logs/%s?lines=%d&type=%s" % (quoted(name), args.lines, wanted_type))
        for entry in body["logs"]:
            backlog.append(dict(entry, process=entry.get("process", name)))
    backlog.sort(key=lambda entry: entry["timestamp"])
    for entry in backlog[-args.lines:] if args.lines else []:
        if args.json:                           # one JSON object per line (NDJSON), as the API's follow
            print(json.dumps(entry))
            continue
        print_log_entry(entry, "%s | " % entry["process"] if prefix_all or "process" in entry and len(names) == 1
                        and entry["process"] != args.name else "")
    sys.stdout.flush()
    if stream is None:
        return 0
    seen = {(entry["timestamp"], entry["process"], entry["message"]) for entry in backlog}
    try:
        while True:
            select.select([stream], [], [])
            for message in stream.messages():
                if message["type"] == "error":
                    raise CliError(error_text({"error": message["data"]}, 400))
                data = message["data"]
                if message["type"] != "log" or (wanted_type != "all" and data["type"] != wanted_type):
                    continue
                if (data["timestamp"], data["process"], data["message"]) in seen:
                    continue
                label = "%s | " % data["process"] if prefix_all or data["process"] != args.name else ""
                if args.json:
                    print(json.dumps(data), flush=True)
                    continue
                print_log_entry(data, label, flush=True)
    except (KeyboardInterrupt, EOFError):
        return 0
    finally:
        stream.close()


def verb_flush(client: Client, args: argparse.Namespace) -> int:
    names = [args.name] if args.name else [entry["name"] for entry in all_processes(client)]
    for name in names:
        answer = client.ok("DELETE", "/api/logs/" + quoted(name))
        print(json.dumps(answer) if args.json else "%s: logs flushed" % name)
    return 0


# -- reading PM2 and supervisord files ----------------------------------------------------------
#    Pure readers: the text of an ecosystem file (JSON, JSON with comments, PM2 YAML, a JS
#    literal) or a supervisord INI in, native app dicts and one-line warnings out. Nothing here
#    talks to the daemon or runs node; the only I/O is reading an INI's [include] files through
#    the function given. Every PM2 or supervisord key is honoured, mapped or warned about.

class ConfigFileError(ValueError):
    """A file that cannot be read as the format it claims; the message names the line."""


FILE_FORMATS = {".json": "json", ".json5": "json", ".yml": "yaml", ".yaml": "yaml", ".js": "js", ".cjs": "js",
                ".mjs": "js", ".conf": "ini", ".ini": "ini", ".toml": "toml"}


def file_format(path: str, text: str) -> str:
    """json, yaml, js, ini or toml: by the file's extension, else by its first meaningful line."""
    known = FILE_FORMATS.get(os.path.splitext(path)[1].lower())
    if known:
        return known
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "//")):
            continue
        if line.startswith(("{", "[")) and not re.match(r"\[[A-Za-z_][\w:. -]*\]\s*\Z", line):
            return "json"
        if line.startswith("["):
            return "ini"
        if re.match(r"(module\.exports|export |const |let |var |'use strict'|\"use strict\")", line):
            return "js"
        return "yaml"
    return "json"


# -- JSON as people write it: comments and trailing commas ------------------------------------

def strip_json_extras(text: str) -> str:
    """JSON text without // and /* */ comments and trailing commas (strings untouched); the
    line breaks stay, so json's error positions still name the right line."""
    out, index, length = [], 0, len(text)
    while index < length:
        char = text[index]
        if char == '"':
            end = index + 1
            while end < length and text[end] != '"':
                end += 2 if text[end] == "\\" else 1
            out.append(text[index:end + 1])
            index = end + 1
        elif text.startswith("//", index):
            end = text.find("\n", index)
            index = length if end < 0 else end
        elif text.startswith("/*", index):
            end = text.find("*/", index + 2)
            end = length if end < 0 else end + 2
            out.append("\n" * text.count("\n", index, end))
            index = end
        elif char == ",":
            rest = re.match(r"(?:\s|//[^\n]*|/\*.*?\*/)*([\]}])", text[index + 1:], re.S)
            out.append("" if rest else ",")
            index += 1
        else:
            out.append(char)
            index += 1
    return "".join(out)


def read_json_text(text: str) -> Any:
    try:
        return json.loads(strip_json_extras(text.lstrip("\ufeff")))
    except ValueError as exc:
        raise ConfigFileError(str(exc)) from None


# -- PM2 YAML: block maps, block lists, scalars (a small reader of ours) ----------------------

YAML_KEY_RE = re.compile(r"""("(?:[^"\\]|\\.)*"|'(?:[^']|'')*'|[^\s#'"\-\[\]{},][^:#]*?|-[^\s:][^:#]*?)\s*:(?:\s+|\Z)(.*)\Z""")


def read_yaml(text: str) -> Any:
    """The YAML that PM2 files use: nested maps and lists by indentation, plain, quoted and
    block (| >) scalars, flow [a, b] and {a: 1}, comments, one document."""
    lines = []
    for number, raw in enumerate(text.lstrip("\ufeff").splitlines(), 1):
        content = _yaml_strip_comment(raw).rstrip()
        if "\t" in raw[:len(raw) - len(raw.lstrip())]:
            raise ConfigFileError("line %d: a tab in the indentation (YAML indents with spaces)" % number)
        if content.strip() in ("---", "...") and not raw.startswith(" "):
            if content.strip() == "..." or any(line[2] for line in lines):
                break
            continue
        lines.append([number, len(content) - len(content.lstrip(" ")), content.strip(), raw])
    if not any(line[2] for line in lines):
        return None
    value, index = _yaml_block(lines, _yaml_next(lines, 0), None)
    index = _yaml_next(lines, index)
    if index < len(lines):
        raise ConfigFileError("line %d: unexpected %r (check the indentation)" % (lines[index][0], lines[index][2][:40]))
    return value


def _yaml_strip_comment(line: str) -> str:
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"" and (index == 0 or line[index - 1] in " :[{,-"):
            quote = char
        elif char == "#" and (index == 0 or line[index - 1] in " \t"):
            return line[:index]
    return line


def _yaml_next(lines: list, index: int) -> int:
    while index < len(lines) and not lines[index][2]:
        index += 1
    return index


def _yaml_block(lines: list, index: int, parent_indent: Optional[int]) -> Tuple[Any, int]:
    number, indent, content, _ = lines[index]
    if parent_indent is not None and indent <= parent_indent and not content.startswith("- ") and content != "-":
        return None, index
    if content == "-" or content.startswith("- "):
        return _yaml_list(lines, index, indent)
    if YAML_KEY_RE.match(content):
        return _yaml_map(lines, index, indent)
    return _yaml_scalar(content, number), index + 1


def _yaml_list(lines: list, index: int, indent: int) -> Tuple[list, int]:
    items = []
    while index < len(lines) and lines[index][1] == indent and (lines[index][2] == "-" or lines[index][2].startswith("- ")):
        number, _, content, raw = lines[index]
        rest = content[1:].strip()
        if not rest:
            following = _yaml_next(lines, index + 1)
            if following < len(lines) and lines[following][1] > indent:
                value, index = _yaml_block(lines, following, indent)
            else:
                value, index = None, index + 1
        elif YAML_KEY_RE.match(rest) and not rest.startswith(("[", "{")):
            inner = indent + len(content) - len(rest)        # the map starts where its first key does
            lines[index] = [number, inner, rest, raw]
            value, index = _yaml_map(lines, index, inner)
        else:
            value, index = _yaml_scalar(rest, number), index + 1
        items.append(value)
        index = _yaml_next(lines, index)
    return items, index


def _yaml_map(lines: list, index: int, indent: int) -> Tuple[dict, int]:
    mapping: Dict[str, Any] = {}
    while index < len(lines) and lines[index][1] == indent:
        number, _, content, _ = lines[index]
        match = YAML_KEY_RE.match(content)
        if not match or content.startswith("- "):
            break
        key = _yaml_scalar(match.group(1), number)
        key, rest = str(key), match.group(2).strip()
        index += 1
        if rest[:1] in ("|", ">"):
            value, index = _yaml_block_scalar(lines, index, indent, rest)
        elif rest:
            value = _yaml_scalar(rest, number)
        else:
            following = _yaml_next(lines, index)
            nested = following < len(lines) and (lines[following][1] > indent or (
                lines[following][1] == indent and lines[following][2].startswith("- ")))
            value, index = _yaml_block(lines, following, indent - 1 if nested else indent) if nested else (None, index)
        mapping[key] = value
        index = _yaml_next(lines, index)
    return mapping, index


def _yaml_block_scalar(lines: list, index: int, indent: int, header: str) -> Tuple[str, int]:
    texts, inner = [], None
    while index < len(lines):
        raw = lines[index][3]
        stripped = raw.strip()
        width = len(raw) - len(raw.lstrip(" "))
        if stripped and width <= indent:
            break
        if stripped and inner is None:
            inner = width
        texts.append(raw[inner:] if stripped else "")
        index += 1
    while texts and not texts[-1]:
        texts.pop()
    if header.startswith(">"):
        text = re.sub(r"(?<!\n)\n(?!\n)", " ", "\n".join(texts))
    else:
        text = "\n".join(texts)
    return text + ("" if header.endswith("-") else "\n"), index


def _yaml_scalar(text: str, number: int) -> Any:
    text = text.strip()
    if text[:1] in ("[", "{"):
        value, end = _yaml_flow(text, 0, number)
        if text[end:].strip():
            raise ConfigFileError("line %d: unexpected %r after %r" % (number, text[end:].strip()[:20], text[:end]))
        return value
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            return json.loads(text)
        except ValueError:
            raise ConfigFileError("line %d: a bad escape in %s" % (number, text[:60])) from None
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1].replace("''", "'")
    if text in ("", "~", "null", "Null", "NULL"):
        return None
    if text in ("true", "True", "TRUE", "yes", "Yes", "on", "On"):
        return True
    if text in ("false", "False", "FALSE", "no", "No", "off", "Off"):
        return False
    if re.match(r"[-+]?[0-9]+\Z", text):
        return int(text)
    if re.match(r"[-+]?([0-9]+\.[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?\Z", text):
        return float(text)
    return text


def _yaml_flow(text: str, index: int, number: int) -> Tuple[Any, int]:
    """A flow collection [a, b] or {k: v} starting at text[index]; (value, index after it)."""
    closing = "]" if text[index] == "[" else "}"
    items: list = []
    index += 1
    while True:
        while index < len(text) and text[index] in " ,":
            index += 1
        if index >= len(text):
            raise ConfigFileError("line %d: %r is not closed (flow collections stay on one line here)"
                                  % (number, text[:40]))
        if text[index] == closing:
            break
        if text[index] in "[{":
            value, index = _yaml_flow(text, index, number)
        else:
            match = re.compile(r"\s*(\"(?:[^\"\\]|\\.)*\"|'(?:[^']|'')*'|[^,\]}:]+(?::[^\s,\]}][^,\]}:]*)*)(\s*:\s*)?").match(text, index)
            value, index = _yaml_scalar(match.group(1), number), match.end()
            if match.group(2):
                if text[index] in "[{":
                    inner, index = _yaml_flow(text, index, number)
                else:
                    found = re.compile(r"\s*(\"(?:[^\"\\]|\\.)*\"|'(?:[^']|'')*'|[^,\]}]*)").match(text, index)
                    inner, index = _yaml_scalar(found.group(1), number), found.end()
                value = (str(value), inner)
        items.append(value)
    if closing == "]":
        return items, index + 1
    return {key: value for key, value in (item if isinstance(item, tuple) else (str(item), None) for item in items)}, index + 1


# -- JavaScript ecosystem files without node: literals only -----------------------------------

JS_TOKEN_RE = re.compile(r"""\s+|//[^\n]*|/\*.*?\*/|(?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|`(?:[^`\\$]|\\.|\$(?!\{))*`)"""
                         r"""|(?P<number>-?(?:0[xX][0-9a-fA-F]+|(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?))"""
                         r"""|(?P<name>[A-Za-z_$][\w$]*)|(?P<punct>\.\.\.|=>|[{}\[\]:,;=().+*?`\-!|&<>/%])""", re.S)
JS_EXPORTS = (r"module\.exports\s*=", r"exports\.apps\s*=", r"export\s+default", r"export\s+const\s+apps\s*=")
JS_WORDS = {"true": True, "false": False, "null": None, "undefined": None}


def read_js_literal(text: str) -> Any:
    """The value a PM2 JS file exports, when it is a plain literal (module.exports = {...},
    export default {...}, export const apps = [...]); else an error naming the construct and line."""
    start = None
    for pattern in JS_EXPORTS:
        match = re.search(r"^\s*" + pattern, text, re.M)
        if match:
            start = match
            break
    if start is None:
        raise ConfigFileError("found no module.exports = or export default; this reader takes a literal only")
    tokens = _js_tokens(text, start.end())
    if tokens and tokens[0][0] == "name" and tokens[0][1] not in JS_WORDS and (len(tokens) == 1 or tokens[1][1] == ";"):
        named = re.search(r"^\s*(?:const|let|var)\s+%s\s*=" % re.escape(tokens[0][1]), text, re.M)
        if named:                               # const config = {...}; module.exports = config
            tokens = _js_tokens(text[:start.start()], named.end())
    value, index = _js_value(tokens, 0)
    if index < len(tokens) and tokens[index][1] not in (";",):
        _js_refuse(tokens[index])
    named = re.search(r"export\s+const\s+apps\s*=", start.group())
    return {"apps": value} if named or start.group().startswith("exports.apps") else value


def _js_tokens(text: str, offset: int) -> List[Tuple[str, str, int]]:
    tokens, index = [], offset
    while index < len(text):
        match = JS_TOKEN_RE.match(text, index)
        if not match:
            raise ConfigFileError("line %d: cannot read %r" % (text.count("\n", 0, index) + 1, text[index:index + 20]))
        kind = match.lastgroup
        if kind:
            tokens.append((kind, match.group(kind), text.count("\n", 0, index) + 1))
        index = match.end()
    return tokens


def _js_refuse(token: Tuple[str, str, int]) -> None:
    kind, text, line = token
    what = {"require": "require()", "process": "process.env", "__dirname": "__dirname", "__filename": "__filename",
            "path": "path.join()", "...": "spread (...)", "`": "a template literal with ${}"}.get(text, text)
    if kind == "string" and text.startswith("`"):
        what = "a template literal with ${}"
    raise ConfigFileError("line %d: %s is computed, and without node only literals can be read "
                          "(install node, or write the value out)" % (line, what))


def _js_value(tokens: list, index: int) -> Tuple[Any, int]:
    if index >= len(tokens):
        raise ConfigFileError("the file ends inside the exported value")
    kind, text, line = tokens[index]
    following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
    if kind == "punct" and text == "{":
        return _js_object(tokens, index + 1)
    if kind == "punct" and text == "[":
        return _js_array(tokens, index + 1)
    if following == "." and kind == "name" and index + 2 < len(tokens):
        member = tokens[index + 2][1]
        called = index + 3 < len(tokens) and tokens[index + 3][1] == "("
        _js_refuse((kind, "process" if text == "process" else "%s.%s%s" % (text, member, "()" if called else ""), line))
    if following in (".", "(", "+", "[", "?", "`", "||", "&&") and kind != "punct":
        _js_refuse(tokens[index] if kind == "name" else tokens[index + 1])
    if kind == "string":
        if text.startswith("`"):
            return text[1:-1].replace("\\`", "`"), index + 1
        return _js_string(text, line), index + 1
    if kind == "number":
        number = text.replace("_", "")
        value = int(number, 16) if number.lower().startswith(("0x", "-0x")) else float(number)
        return int(value) if isinstance(value, float) and value.is_integer() and "." not in number and "e" not in number.lower() else value, index + 1
    if kind == "name" and text in JS_WORDS:
        return JS_WORDS[text], index + 1
    _js_refuse(tokens[index])


def _js_string(text: str, line: int) -> str:
    body = text[1:-1]
    if text[0] == "'":
        body = body.replace('\\\'', "'").replace('"', '\\"')
    try:
        return json.loads('"%s"' % body)
    except ValueError:
        raise ConfigFileError("line %d: a string this reader cannot decode: %s" % (line, text[:60])) from None


def _js_object(tokens: list, index: int) -> Tuple[dict, int]:
    result = {}
    while True:
        if index >= len(tokens):
            raise ConfigFileError("the file ends inside an object")
        kind, text, line = tokens[index]
        if text == "}":
            return result, index + 1
        if text == "...":
            _js_refuse(tokens[index])
        if kind == "string":
            key = _js_string(text, line) if not text.startswith("`") else text[1:-1]
        elif kind in ("name", "number"):
            key = text
        elif text == "[":
            raise ConfigFileError("line %d: a computed key [...] is computed, and without node only literals "
                                  "can be read (install node, or write the value out)" % line)
        else:
            raise ConfigFileError("line %d: expected a key, got %r" % (line, text))
        if index + 1 >= len(tokens) or tokens[index + 1][1] != ":":
            if index + 1 < len(tokens) and tokens[index + 1][1] == "(":
                raise ConfigFileError("line %d: a method %s() is computed, and without node only literals "
                                      "can be read (install node, or write the value out)" % (line, key))
            raise ConfigFileError("line %d: expected ':' after %r (shorthand {%s} is computed; write %s: value)"
                                  % (line, key, key, key))
        result[key], index = _js_value(tokens, index + 2)
        if index < len(tokens) and tokens[index][1] == ",":
            index += 1
        elif index < len(tokens) and tokens[index][1] != "}":
            _js_refuse(tokens[index])


def _js_array(tokens: list, index: int) -> Tuple[list, int]:
    items = []
    while True:
        if index >= len(tokens):
            raise ConfigFileError("the file ends inside an array")
        if tokens[index][1] == "]":
            index += 1
            if index < len(tokens) and tokens[index][1] == ".":
                _js_refuse((tokens[index][0], ".map()", tokens[index][2]))
            return items, index
        if tokens[index][1] == "...":
            _js_refuse(tokens[index])
        value, index = _js_value(tokens, index)
        items.append(value)
        if index < len(tokens) and tokens[index][1] == ",":
            index += 1
        elif index < len(tokens) and tokens[index][1] != "]":
            _js_refuse(tokens[index])


# -- PM2 apps to ours: every documented key honoured, mapped or skipped with a reason ----------

# PM2 keys with another name here (same meaning).
PM2_RENAMES = {"ignore_watch": "watch_ignore", "err_file": "error_file", "error": "error_file", "out": "out_file",
               "output": "out_file", "uid": "user", "gid": "group", "interpreterArgs": "interpreter_args",
               "execMode": "exec_mode", "maxMemoryRestart": "max_memory_restart", "killTimeout": "kill_timeout",
               "restartDelay": "restart_delay", "minUptime": "min_uptime", "maxRestarts": "max_restarts",
               "cronRestart": "cron_restart", "waitReady": "wait_ready", "listenTimeout": "listen_timeout",
               "nodeArgs": "node_args", "mergeLogs": "merge_logs", "logDateFormat": "log_date_format",
               "instanceVar": "instance_var", "incrementVar": "increment_var", "ignoreWatch": "watch_ignore",
               "errorFile": "error_file", "outFile": "out_file", "logFile": "log_file", "pidFile": "pid_file",
               "shutdown_with_message": "shutdown_with_message", "stopExitCodes": "stop_exit_codes"}
# PM2 keys that have no equivalent here, and why they can be left out.
PM2_SKIPPED = {
    "log_file": "one combined log file is not kept; stdout and stderr have their own files (`logs` shows both)",
    "log": "one combined log file is not kept; stdout and stderr have their own files (`logs` shows both)",
    "pid_file": "pids are in `ls`/`info` and GET /api/processes, not in files",
    "source_map_support": "a node runtime option of PM2's own wrapper", "vizion": "PM2's git metadata",
    "automation": "PM2's keymetrics agent", "pmx": "PM2's keymetrics agent", "trace": "PM2's keymetrics agent",
    "disable_trace": "PM2's keymetrics agent", "deep_monitoring": "PM2's keymetrics agent",
    "post_update": "PM2's git deploy", "force": "a name is always one process or group here",
    "append_env_name": "names stay as written", "treekill": "the whole process group is always stopped",
    "windowsHide": "Windows only", "watch_options": "chokidar options; watching polls here",
    "shutdown_with_message": "stopping is by signal (kill_signal)", "kill_retry_time": "one SIGKILL follows kill_timeout",
    "filter_env": "children get the daemon's environment minus its secrets, plus env",
    "exec_interpreter": None, "max_restart": None, "instance_var": "NODE_APP_INSTANCE and PM2_INSTANCE_ID are always set",
    "listen_timeout_ms": None, "disable_logs": "output is always logged (rotated, see log_max_size)",
    "container": "not a container runtime", "docker": "not a container runtime", "dist": "not a container runtime",
    "node_version": "node is the one on PATH or interpreter", "cwd_reload": None, "version": "metadata",
    "description": "metadata", "script_args": None, "combine_logs": None, "merge_logs": None, "time": None,
    "exec_mode": None, "node_args": None, "increment_var": None, "log_type": "lines are plain text (the API gives JSON)",
    "autodump": "state is saved continuously", "namespace_env": None, "vizion_running": "PM2's git metadata",
}
PM2_DEPLOY_KEYS = ("deploy",)


def cpu_count() -> int:
    return os.cpu_count() or 1


def pm2_apps(data: Any) -> List[dict]:
    """The apps of an ecosystem file: {"apps": [...]}, {"apps": {...}}, a list, or one app; a
    module compiled from TypeScript or ESM keeps them under "default" (exports.default = ...)."""
    if isinstance(data, dict) and "apps" not in data and isinstance(data.get("default"), (dict, list)):
        data = data["default"]
    if isinstance(data, dict) and "apps" in data:
        data = data["apps"]
    elif isinstance(data, dict) and "script" not in data and "name" not in data and data:
        raise ConfigFileError("expected apps: a list of apps, a list, or one app with a script")
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(app, dict) for app in data):
        raise ConfigFileError("expected a list of process objects under 'apps'")
    return data


def _number_text(value: Any) -> Any:
    """PM2 takes numbers written as strings ("4", "3000"); so do we."""
    if isinstance(value, str) and re.match(r"\s*-?[0-9]+\s*\Z", value):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _env_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value) if not isinstance(value, float) or \
        not value.is_integer() else str(int(value))


def pm2_instances(value: Any, warnings: List[str], label: str) -> Any:
    """instances as PM2 reads it: "max"/0 = one per CPU, -1 = CPUs less one, numbers as strings."""
    value = _number_text(value)
    if isinstance(value, str) and value.strip().lower() == "max":
        value = 0
    if not _is_int(value):
        return value
    if value <= 0:
        count = max(1, cpu_count() + value)
        warnings.append("%s: instances %s means %d here (CPUs on this machine: %d)" % (label, value, count, cpu_count()))
        value = count
    if value > MAX_INSTANCES:
        warnings.append("%s: instances %d is more than %d; %d run" % (label, value, MAX_INSTANCES, MAX_INSTANCES))
        value = MAX_INSTANCES
    return value


def pm2_hours(value: Any) -> Any:
    """PM2 durations may say hours ("1h"); ours go up to minutes."""
    match = re.match(r"\s*([0-9]{1,4}(?:\.[0-9]{1,3})?)\s*h\s*\Z", value) if isinstance(value, str) else None
    return "%gm" % (float(match.group(1)) * 60) if match else value


def interpreter_for(script: str) -> Optional[str]:
    """The interpreter PM2 picks by extension: .py python3, .sh bash, .js/.cjs/.mjs/.ts node."""
    extension = os.path.splitext(script)[1].lower()
    return {".py": "python3", ".sh": "bash", ".js": "node", ".cjs": "node", ".mjs": "node",
            ".ts": "ts-node", ".rb": "ruby", ".php": "php", ".pl": "perl", ".coffee": "coffee"}.get(extension)


def pm2_to_native(app: dict, env_name: Optional[str], base_dir: str, origin: Optional[str] = None) -> Tuple[dict, List[str]]:
    """One PM2 app as our config (the keys of CONFIG_FIELDS) and its warnings, each one line."""
    warnings: List[str] = []
    app = {PM2_RENAMES.get(key, key): value for key, value in app.items()}
    name = app.get("name")
    if name is None and isinstance(app.get("script"), str):
        name = re.sub(r"[^A-Za-z0-9._-]", "-", os.path.splitext(os.path.basename(app["script"]))[0])[:64] or "app"
    label = str(name)
    if isinstance(name, str) and not NAME_RE.match(name) and name.strip():
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", name.strip()).strip("-._")[:64] or "app"
        warnings.append("%s: the name is %r here (letters, digits, . _ - only)" % (label, name))
    if isinstance(app.get("namespace"), str) and not NAMESPACE_RE.match(app["namespace"]):
        app["namespace"] = re.sub(r"[^A-Za-z0-9._-]+", "-", app["namespace"].strip()).strip("-._")[:64] or "default"
    config: Dict[str, Any] = {}
    env = app.pop("env", None)
    env = dict(env) if isinstance(env, dict) else env
    chosen = app.get("env_" + env_name) if env_name else None
    for key in [key for key in app if key.startswith("env_")]:
        app.pop(key)
    if isinstance(chosen, dict):
        env = dict(env or {}, **chosen) if isinstance(env, dict) or env is None else env
    if isinstance(env, dict):
        config["env"] = {str(key): _env_text(value) for key, value in env.items() if value is not None}
    elif env is not None:
        config["env"] = env                     # validation names it
    for key, value in app.items():
        if key in ("name", "env"):
            continue
        if key in CONFIG_FIELDS and key not in ("instances", "watch", "log_date_format", "merge_logs", "watch_ignore",
                                                "args", "interpreter_args", "cron_restart", "out_file", "error_file",
                                                "interpreter", "wait_ready"):
            config[key] = _number_text(value) if key in ("max_restarts", "log_max_files", "cpu_limit") else \
                pm2_hours(value) if key in ("min_uptime", "restart_delay", "kill_timeout", "listen_timeout") else value
        elif key in PM2_SKIPPED and PM2_SKIPPED[key]:
            warnings.append("%s: %s skipped: %s" % (label, key, PM2_SKIPPED[key]))
        elif key not in PM2_SKIPPED and key not in CONFIG_FIELDS:
            warnings.append("%s: %s skipped: not a PM2 or pmdaemon setting" % (label, key))
    config["name"] = name
    _pm2_program(app, config, warnings, label, base_dir)
    _pm2_logs(app, config, warnings, label)
    _pm2_behaviour(app, config, warnings, label)
    if origin:
        config["origin"] = origin
    order = {PM2_RENAMES.get(key, key): index for index, key in enumerate(app)}      # errors in the file's order
    return {key: value for key, value in sorted(config.items(), key=lambda item: order.get(item[0], len(order)))
            if value is not None or key == "name"}, warnings


def _pm2_program(app: dict, config: dict, warnings: List[str], label: str, base_dir: str) -> None:
    script = app.get("script")
    args = app.get("args", app.get("script_args"))
    config["args"] = shlex.split(args) if isinstance(args, str) else [str(item) if isinstance(item, (int, float)) and not isinstance(item, bool) else item for item in args] if isinstance(args, list) else args
    cwd = app.get("cwd")
    config["cwd"] = os.path.normpath(os.path.join(base_dir, os.path.expanduser(cwd))) if isinstance(cwd, str) else base_dir if cwd is None else cwd
    interpreter = app.get("interpreter", app.get("exec_interpreter"))
    interpreter_args = app.get("interpreter_args")
    interpreter_args = shlex.split(interpreter_args) if isinstance(interpreter_args, str) else interpreter_args
    node_args = app.get("node_args")
    node_args = shlex.split(node_args) if isinstance(node_args, str) else node_args
    config["script"] = script
    if isinstance(script, str) and script.startswith("npm ") or script in ("npm", "yarn", "pnpm") and False:
        pass
    if isinstance(script, str) and " " in script and not os.path.exists(os.path.join(config["cwd"] if isinstance(config["cwd"], str) else "", script)) \
            and interpreter is None:
        parts = shlex.split(script)                 # "npm run start": PM2 runs the command line
        config["script"], config["args"] = parts[0], parts[1:] + list(config["args"] or [])
        warnings.append("%s: script %r is a command line; it runs as %s with arguments %s"
                        % (label, script, parts[0], parts[1:]))
    if interpreter == "none" or (interpreter is None and not isinstance(script, str)):
        interpreter = None
    elif interpreter is None:
        interpreter = interpreter_for(script)
    config["interpreter"] = interpreter
    extra = list(interpreter_args or [])
    if node_args:
        if interpreter and os.path.basename(interpreter).startswith("node"):
            extra = list(node_args) + extra
        else:
            warnings.append("%s: node_args skipped: the interpreter is %s, not node" % (label, interpreter or "none"))
    if extra or interpreter_args is not None:
        config["interpreter_args"] = extra if interpreter else None
        if not interpreter and extra:
            warnings.append("%s: interpreter_args skipped: no interpreter (interpreter is none)" % label)


def _pm2_log_path(config: dict, field: str, value: Any, warnings: List[str], label: str) -> Any:
    if value in (None, False):
        return None
    if value in ("/dev/null", "NULL", "null") or value is True:
        warnings.append("%s: %s %s skipped: output is kept in pmdaemon's rotated logs" % (label, field, value))
        return None
    if isinstance(value, str):
        return os.path.normpath(os.path.join(config["cwd"] if isinstance(config["cwd"], str) else "/", os.path.expanduser(value)))
    return value


def _pm2_logs(app: dict, config: dict, warnings: List[str], label: str) -> None:
    for field in ("out_file", "error_file"):
        if field in app:
            config[field] = _pm2_log_path(config, field, app[field], warnings, label)
    if "merge_logs" in app or "combine_logs" in app:
        if not isinstance(app.get("merge_logs", app.get("combine_logs")), bool):
            config["merge_logs"] = app.get("merge_logs", app.get("combine_logs"))   # validation names it
        # PM2's merge_logs: copies share one file, no -ID suffix; copies here always share out_file.
    fmt = app.get("log_date_format")
    if fmt in ("iso", "none"):
        config["log_date_format"] = fmt
    elif isinstance(fmt, str):
        config["log_date_format"] = "iso"
        warnings.append("%s: log_date_format %r: lines are stamped in ISO 8601 (UTC) instead" % (label, fmt))
    elif fmt is not None:
        config["log_date_format"] = fmt
    if app.get("time") is True:
        config.setdefault("log_date_format", "iso")
    elif app.get("time") is False and fmt is None:
        config["log_date_format"] = "none"


def _pm2_behaviour(app: dict, config: dict, warnings: List[str], label: str) -> None:
    mode = app.get("exec_mode")
    instances = pm2_instances(app.get("instances"), warnings, label) if "instances" in app else None
    cluster = isinstance(mode, str) and mode.startswith("cluster")
    if cluster and "instances" not in app:
        instances = cpu_count()
    elif mode is not None and mode not in ("fork", "fork_mode", "cluster", "cluster_mode"):
        warnings.append("%s: exec_mode %r skipped: not fork or cluster" % (label, mode))
    if instances is not None:
        config["instances"] = instances
    watch = app.get("watch")
    config["watch"] = [watch] if isinstance(watch, str) else watch
    ignore = app.get("watch_ignore")
    if ignore is not None:
        ignore = [ignore] if isinstance(ignore, str) else ignore
        config["watch_ignore"] = list(WATCH_IGNORE_DEFAULT) + [item for item in ignore if item not in WATCH_IGNORE_DEFAULT] \
            if isinstance(ignore, list) else ignore
    cron = app.get("cron_restart")
    if isinstance(cron, str) and len(cron.split()) == 6:
        warnings.append("%s: cron_restart %r: the seconds field is dropped (minutes are the finest here)" % (label, cron))
        cron = " ".join(cron.split()[1:])
    if cron is not False:
        config["cron_restart"] = cron
    increment = app.get("increment_var")
    port = _number_text((config.get("env") or {}).get(increment)) if isinstance(increment, str) else None
    if increment == "PORT" and _is_int(port) and "port" not in app:
        config["port"] = str(port) if (instances or 1) == 1 else "%d-%d" % (port, port + (instances or 1) - 1)
        config["env"] = {key: value for key, value in config["env"].items() if key != "PORT"}
    elif increment is not None:
        warnings.append("%s: increment_var %r skipped: only PORT is incremented (through port)" % (label, increment))
    if cluster and "port" not in config and "port" not in app:
        warnings.append("%s: exec_mode cluster: %s separate processes; there is no shared listening socket, so "
                        "give each its own port (port: \"3000-3003\")" % (label, instances))
    if app.get("wait_ready") is True:
        if "health_check" in app:
            config["wait_ready"] = True
        else:
            warnings.append("%s: wait_ready skipped: there is no process.send('ready') here; add a health_check "
                            "to wait for readiness (listen_timeout kept)" % label)
    elif "wait_ready" in app:
        config["wait_ready"] = app["wait_ready"]
    if "autorestart" in app and isinstance(app["autorestart"], str):
        config["autorestart"] = app["autorestart"].lower() in ("true", "1", "yes")
    for field in ("instances", "max_restarts"):
        if field in config:
            config[field] = _number_text(config[field])


# -- supervisord INI to ours --------------------------------------------------------------------

SUPERVISORD_NOTED = ("supervisord", "supervisorctl", "unix_http_server", "inet_http_server", "rpcinterface",
                     "ctlplugin", "include")
SUPERVISORD_UNSUPPORTED = ("eventlistener", "fcgi-program")
SUPERVISORD_SKIPPED = {
    "exitcodes": None, "startretries": None, "numprocs_start": None, "process_name": None, "numprocs": None,
    "stdout_capture_maxbytes": "process communication events are not emitted",
    "stderr_capture_maxbytes": "process communication events are not emitted",
    "stdout_events_enabled": "events are the WebSocket's, always on", "stderr_events_enabled": "events are the WebSocket's, always on",
    "stdout_syslog": "logs go to files and the API, not syslog", "stderr_syslog": "logs go to files and the API, not syslog",
    "serverurl": "children are not given a supervisor URL", "stopasgroup": None, "killasgroup": None,
    "stdout_logfile_backups": None, "stderr_logfile_backups": None,
}


def supervisord_environment(text: str, where: str) -> Dict[str, str]:
    """environment=KEY="value",KEY2=value2 (supervisord's quoting, commas between pairs)."""
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace, lexer.whitespace_split, lexer.commenters = ",", True, ""
    env = {}
    try:
        for pair in lexer:
            key, equals, value = pair.strip().partition("=")
            if not equals:
                raise ConfigFileError("%s: environment entry %r is not KEY=value" % (where, pair.strip()[:60]))
            env[key.strip()] = value
    except ValueError as exc:
        raise ConfigFileError("%s: environment: %s" % (where, exc)) from None
    return env


def read_supervisord(text: str, path: str, environ: Dict[str, str], read_include: Callable[[str], List[Tuple[str, str]]],
                     origin: Optional[str] = None) -> Tuple[List[dict], List[str]]:
    """The [program:x] sections of a supervisord file (and its [include] files) as our apps in
    start order (priority, then file order), with warnings; configparser is loaded only here."""
    import configparser
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";",), strict=False, delimiters=("=", ":"))
    parser.optionxform = str
    here = os.path.dirname(os.path.abspath(path))
    sources = [(path, text)]
    warnings: List[str] = []
    try:
        parser.read_string(text, source=path)
        if parser.has_section("include") and parser.has_option("include", "files"):
            for pattern in parser.get("include", "files").split():
                for included_path, included in read_include(os.path.join(here, _supervisord_expand(
                        pattern, dict(_env_names(environ), here=here), "[include] files"))):
                    sources.append((included_path, included))
                    parser.read_string(included, source=included_path)
    except configparser.Error as exc:
        raise ConfigFileError(" ".join(str(exc).split())) from None
    groups: Dict[str, str] = {}
    for section in parser.sections():
        kind, _, name = section.partition(":")
        if kind == "group":
            for program in parser.get(section, "programs", fallback="").split(","):
                if program.strip():
                    groups[program.strip()] = name
    apps: List[Tuple[int, int, dict]] = []
    for order, section in enumerate(parser.sections()):
        kind, _, name = section.partition(":")
        if kind == "program":
            for app in _supervisord_program(dict(parser.items(section)), name, groups.get(name), here, environ, warnings):
                if origin:
                    app["origin"] = origin
                apps.append((app.pop("priority"), order, app))
        elif kind in SUPERVISORD_UNSUPPORTED:
            warnings.append("[%s] not supported: pmdaemon runs programs, not %s" % (
                section, "event listeners" if kind == "eventlistener" else "FastCGI sockets"))
        elif kind == "group":
            continue
        elif kind in SUPERVISORD_NOTED:
            warnings.append("[%s] noted and skipped: the daemon's own settings are `web` flags" % section
                            if kind != "include" else "[include] read: %d file(s)" % (len(sources) - 1))
        else:
            warnings.append("[%s] skipped: not a supervisord section" % section)
    return [app for _, _, app in sorted(apps, key=lambda item: item[:2])], warnings


def _env_names(environ: Dict[str, str]) -> Dict[str, str]:
    return {"ENV_" + key: value for key, value in environ.items()}


def _supervisord_expand(value: str, names: Dict[str, Any], where: str) -> str:
    """supervisord's interpolation: Python %-formatting over ENV_X, here, program_name, ..."""
    try:
        return value % names
    except KeyError as exc:
        raise ConfigFileError("%s: %%(%s)s names nothing (known: ENV_*, %s)" % (
            where, exc.args[0], ", ".join(sorted(key for key in names if not key.startswith("ENV_"))))) from None
    except (ValueError, TypeError) as exc:
        raise ConfigFileError("%s: bad %% expression in %r: %s" % (where, value[:80], exc)) from None


def _supervisord_bool(value: str, where: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise ConfigFileError("%s: %r is not true or false" % (where, value))


def _supervisord_int(value: str, where: str) -> int:
    if not re.match(r"\s*-?[0-9]+\s*\Z", value):
        raise ConfigFileError("%s: %r is not a whole number" % (where, value))
    return int(value)


def _supervisord_size(value: str, where: str) -> int:
    match = re.match(r"\s*([0-9]+)\s*(KB|MB|GB|B)?\s*\Z", value, re.I)
    if not match:
        raise ConfigFileError("%s: %r is not a size like 50MB" % (where, value))
    return int(match.group(1)) * {"": 1, "B": 1, "KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3}[(match.group(2) or "").upper()]


def _supervisord_program(options: Dict[str, str], program: str, group: Optional[str], here: str,
                         environ: Dict[str, str], warnings: List[str]) -> List[dict]:
    section = "[program:%s]" % program
    numprocs = _supervisord_int(options.get("numprocs", "1"), section + " numprocs")
    start = _supervisord_int(options.get("numprocs_start", "0"), section + " numprocs_start")
    process_name = options.get("process_name", "%(program_name)s" if numprocs == 1 else "%(program_name)s_%(process_num)02d")
    if numprocs > 1 and "process_num" not in process_name:
        raise ConfigFileError("%s: numprocs is %d but process_name %r has no %%(process_num)" % (section, numprocs, process_name))
    apps = []
    for process_num in range(start, start + numprocs):
        names = dict(_env_names(environ), here=here, program_name=program, process_num=process_num,
                     group_name=group or program, host_node_name=socket.gethostname(), numprocs=numprocs)
        names["process_name"] = _supervisord_expand(process_name, names, section + " process_name")
        expanded = {key: _supervisord_expand(value, names, "%s %s" % (section, key)) for key, value in options.items()}
        apps.append(_supervisord_app(expanded, names["process_name"], group, section, warnings if process_num == start else []))
    return apps


def _supervisord_app(options: Dict[str, str], name: str, group: Optional[str], section: str, warnings: List[str]) -> dict:
    if "command" not in options:
        raise ConfigFileError("%s: command is required" % section)
    try:
        command = shlex.split(options["command"])
    except ValueError as exc:
        raise ConfigFileError("%s command: %s" % (section, exc)) from None
    if not command:
        raise ConfigFileError("%s: command is empty" % section)
    app: Dict[str, Any] = {"name": name, "script": command[0], "args": command[1:],
                           "priority": _supervisord_int(options.get("priority", "999"), section + " priority")}
    if group:
        app["namespace"] = group
    if "directory" in options:
        app["cwd"] = options["directory"]
    where = lambda key: "%s %s" % (section, key)
    autorestart = options.get("autorestart", "unexpected").strip().lower()
    codes = [_supervisord_int(code, where("exitcodes")) for code in options.get("exitcodes", "0").split(",") if code.strip()]
    if autorestart == "unexpected":
        app["autorestart"], app["stop_exit_codes"] = True, codes
    else:
        app["autorestart"] = _supervisord_bool(autorestart, where("autorestart"))
    simple = {"autostart": ("autostart", _supervisord_bool), "startsecs": ("min_uptime", None),
              "startretries": ("max_restarts", _supervisord_int), "stopwaitsecs": ("kill_timeout", None),
              "user": ("user", None), "umask": ("umask", None), "stopsignal": ("kill_signal", None)}
    for key, (field, convert) in simple.items():
        if key in options:
            value = options[key].strip()
            if key in ("startsecs", "stopwaitsecs"):
                value = _supervisord_int(value, where(key)) * 1000
            app[field] = convert(value, where(key)) if convert else value
    if "environment" in options:
        app["env"] = supervisord_environment(options["environment"], where("environment"))
    merged = _supervisord_bool(options.get("redirect_stderr", "false"), where("redirect_stderr"))
    if merged:
        app["merge_logs"] = True
    for stream, field in (("stdout", "out_file"), ("stderr", "error_file")):
        path = options.get(stream + "_logfile", "AUTO").strip()
        if path.upper() == "AUTO" or (merged and stream == "stderr"):
            continue
        if path.upper() == "NONE" or path == "/dev/null":
            warnings.append("%s %s_logfile %s: output is kept in pmdaemon's rotated logs instead" % (section, stream, path))
        elif path in ("/dev/stdout", "/dev/stderr", "/proc/self/fd/1", "/proc/self/fd/2", "syslog"):
            warnings.append("%s %s_logfile %s: output goes to pmdaemon's logs (`logs -f` follows it)" % (section, stream, path))
        else:
            app[field] = os.path.normpath(os.path.join(app.get("cwd", "/"), path))
    for key, field in (("logfile_maxbytes", "log_max_size"), ("logfile_backups", "log_max_files")):
        values = {options[stream + "_" + key].strip() for stream in ("stdout", "stderr") if stream + "_" + key in options}
        for value in sorted(values):
            number = _supervisord_size(value, where(key)) if key == "logfile_maxbytes" else _supervisord_int(value, where(key))
            if number == 0:
                warnings.append("%s %s 0 (unlimited): logs rotate at the default here" % (section, key))
            elif field not in app or number > app[field]:
                app[field] = min(number, 100) if field == "log_max_files" else number
        if len(values) > 1:
            warnings.append("%s stdout_ and stderr_%s differ: the larger serves both" % (section, key))
    for key in ("stopasgroup", "killasgroup"):
        if key in options and not _supervisord_bool(options[key], where(key)):
            warnings.append("%s %s false: the whole process group is stopped here all the same" % (section, key))
    for key in options:
        if key in SUPERVISORD_SKIPPED and SUPERVISORD_SKIPPED[key]:
            warnings.append("%s %s skipped: %s" % (section, key, SUPERVISORD_SKIPPED[key]))
        elif key not in SUPERVISORD_SKIPPED and key not in (
                "command", "priority", "directory", "autorestart", "environment", "redirect_stderr", "stdout_logfile",
                "stderr_logfile", "stdout_logfile_maxbytes", "stderr_logfile_maxbytes") and key not in simple:
            warnings.append("%s %s skipped: not a supervisord program setting" % (section, key))
    return app


# -- files of processes: apply, save, resurrect ------------------------------------------------

NATIVE_MARK = "pmdaemon"        # {"pmdaemon": 1, "apps": [...]}: our own fields, read as they are
NODE_EXPORT_SCRIPT = r"""
const file = process.argv[1];
const url = require("url");
const stubbed = [];
if (process.argv[2] === "stub-missing") {       // a package of the project not installed here
  const Module = require("module");
  const load = Module._load;
  const stub = new Proxy(function () {}, { get: (target, key) => key === Symbol.toPrimitive ? () => "" : stub,
                                           apply: () => stub, construct: () => stub });
  Module._load = function (request, ...rest) {
    try { return load.call(this, request, ...rest); } catch (error) {
      if (error.code !== "MODULE_NOT_FOUND" || request.startsWith(".") || request.startsWith("/")) throw error;
      stubbed.push(request);
      return stub;
    }
  };
}
async function load() {
  try { return require(file); } catch (error) {
    if (error.code !== "ERR_REQUIRE_ESM" && !(error instanceof SyntaxError)) throw error;
    return await import(url.pathToFileURL(file).href);
  }
}
load().then((value) => {
  if (value && typeof value === "object" && value[Symbol.toStringTag] === "Module")
    value = value.default !== undefined ? value.default : { apps: value.apps };
  process.stdout.write(JSON.stringify({ value: value === undefined ? null : value, stubbed }));
}, (error) => { process.stderr.write(String(error && error.name + ": " + error.message || error).split("\n")[0]); process.exit(1); });
"""


def read_js_file(path: str, text: str, warnings: List[str], stub_missing: bool = False) -> Any:
    """An ecosystem .js/.cjs/.mjs file through node when it is on PATH (it may compute its
    config), else through read_js_literal; node's own error, first line, when it fails.
    stub_missing (dry run, convert): a package the project has and this machine lacks
    (dotenv, ...) is replaced by a stub that does nothing, with a warning."""
    node = shutil.which("node")
    if node is None:
        return read_js_literal(text)
    command = [node, "-e", NODE_EXPORT_SCRIPT, os.path.abspath(path)] + (["stub-missing"] if stub_missing else [])
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=os.path.dirname(os.path.abspath(path)),
                              timeout=NODE_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise ConfigFileError("node did not finish reading it within %d s" % NODE_TIMEOUT) from None
    if done.returncode != 0:
        said = done.stderr.decode("utf-8", "replace").strip()
        if said.startswith("SyntaxError"):      # e.g. `export default` in a .js that node takes as CommonJS
            with contextlib.suppress(ConfigFileError):
                return read_js_literal(text)
        raise ConfigFileError("node could not load it: %s" % said[:300])
    answer = json.loads(done.stdout.decode("utf-8"))
    warnings.extend("module %r is not installed here: a stub stood in for it, so what it computes is missing "
                    "(install the project's packages for the real values)" % name for name in answer["stubbed"])
    return answer["value"]


def read_include(pattern: str) -> List[Tuple[str, str]]:
    import glob
    found = []
    for name in sorted(glob.glob(pattern)):
        with open(name, encoding="utf-8") as handle:
            found.append((name, handle.read()))
    return found


class AppsFile(NamedTuple):
    """What a file of processes says, in our fields: apps in start order, warnings, format."""
    apps: List[dict]
    warnings: List[str]
    format: str
    origin: str


def load_apps_file(path: str, env_name: Optional[str] = None, stub_missing: bool = False) -> AppsFile:
    """Read a native, PM2 (JSON, YAML, JS) or supervisord file; ConfigFileError/OSError."""
    origin = "file:" + os.path.abspath(path)
    with open(path, "rb") as handle:
        text = handle.read().decode("utf-8")
    kind = file_format(path, text)
    base_dir = os.path.dirname(os.path.abspath(path))
    if kind == "ini":
        apps, warnings = read_supervisord(text, path, dict(os.environ), read_include, origin)
        return AppsFile([dict(app, cwd=app.get("cwd") or base_dir) for app in apps], warnings, kind, origin)
    if kind == "toml":
        try:
            import tomllib  # novm: Python 3.11+, guarded by the ImportError below
        except ImportError:
            raise ConfigFileError("reading TOML needs Python 3.11 or newer; use a .json file") from None
        data = tomllib.loads(text)
    file_warnings: List[str] = []
    if kind == "js":
        data = read_js_file(path, text, file_warnings, stub_missing)
    elif kind == "yaml":
        data = read_yaml(text)
    elif kind != "toml":
        data = read_json_text(text)
    if isinstance(data, dict) and data.get(NATIVE_MARK):
        apps = pm2_apps(data)
        return AppsFile([dict(app, origin=app.get("origin", origin)) for app in apps], [], "native", origin)
    apps, warnings = [], file_warnings
    if isinstance(data, dict) and "apps" in data:
        warnings.extend("%s skipped: %s" % (key, "PM2's git deploy (use your own deploy tool)" if key == "deploy"
                                            else "not a PM2 ecosystem key") for key in data if key != "apps")
    if env_name and not any("env_" + env_name in app for app in pm2_apps(data)):
        warnings.append("--env %s: no app has an env_%s block; env alone is used" % (env_name, env_name))
    for app in pm2_apps(data):
        native, said = pm2_to_native(app, env_name, base_dir, origin)
        apps.append(native)
        warnings.extend(said)
    return AppsFile(apps, warnings, kind, origin)


def validate_app(app: dict) -> Tuple[Optional[dict], List[Tuple[str, str]]]:
    """Every bad field of one app (not just the first): (its full config or None, [(field, message)])."""
    errors = []
    values = {}
    for key, value in app.items():
        field = CONFIG_FIELDS.get(key)
        if field is None:
            errors.append((key, "unknown field %r" % key[:80]))
            continue
        if value is None:                   # null: the default; a required field has none
            if field.required:
                errors.append((key, "field %r is required" % key))
            continue
        try:
            values[key] = field.parse(value)
        except PMDaemonError as exc:
            errors.append((key, exc.message))
    for required in ("name", "script"):
        if app.get(required) is None and not any(field == required for field, _ in errors):
            errors.append((required, "field %r is required" % required))
    if errors:
        return None, errors
    config = ProcessConfig(**values)
    try:
        config.check_consistency()
    except PMDaemonError as exc:
        return None, [(exc.field if hasattr(exc, "field") else "?", exc.message)]
    return config.to_dict(), []


def file_problems(config: dict) -> List[str]:
    """What the original project would have that this machine may lack: a directory, a script."""
    said = []
    if not os.path.isdir(config["cwd"]):
        said.append("cwd %s does not exist" % config["cwd"])
    elif "/" in config["script"] or config["interpreter"]:
        if not os.path.exists(os.path.join(config["cwd"], config["script"])):
            said.append("script %s does not exist" % os.path.join(config["cwd"], config["script"]))
    elif not config["shell"] and shutil.which(config["script"], path=os.environ.get("PATH", os.defpath)) is None \
            and not os.path.exists(os.path.join(config["cwd"], config["script"])):
        said.append("command %s is not on PATH" % config["script"])
    if config["interpreter"] and "/" not in config["interpreter"] and shutil.which(config["interpreter"]) is None:
        said.append("interpreter %s is not on PATH" % config["interpreter"])
    if config["user"] is not None and os.geteuid() != 0:
        said.append("user %s: only a daemon run as root can switch users" % config["user"])
    return said


def current_configs(client: Client) -> Dict[str, dict]:
    """Every process's settings by its base name (a group once)."""
    found: Dict[str, dict] = {}
    for entry in all_processes(client):
        details = client.ok("GET", "/api/processes/" + quoted(entry["name"]))
        config = details["config"]
        if config["name"] not in found:
            if details.get("port") is not None and config.get("port"):
                config["env"].pop("PORT", None)
            found[config["name"]] = config
    return found


def apply_plan(loaded: AppsFile, current: Dict[str, dict], prune: bool) -> dict:
    """create / update (with the changed keys) / unchanged / delete, errors and warnings (pure
    but for the file checks of file_problems)."""
    plan: Dict[str, Any] = {"file": loaded.origin[5:], "format": loaded.format, "create": [], "update": [],
                            "unchanged": [], "delete": [], "errors": [], "warnings": list(loaded.warnings), "apps": []}
    seen = set()
    for app in loaded.apps:
        label = str(app.get("name", "?"))
        app = dict(app)
        wanted_status = app.pop("status", None)         # what `save` recorded: online or stopped
        config, errors = validate_app(app)
        plan["errors"].extend({"app": label, "field": field, "message": text} for field, text in errors)
        if config is None:
            continue
        if config["name"] in seen:
            plan["errors"].append({"app": label, "field": "name", "message": "the name %r is used twice" % label})
            continue
        seen.add(config["name"])
        plan["warnings"].extend("%s: %s" % (label, text) for text in file_problems(config))
        plan["apps"].append(dict(config, status=wanted_status) if wanted_status else config)
        old = current.get(config["name"])
        if old is None:
            plan["create"].append(label)
            continue
        changed = sorted(key for key in config if old.get(key) != config[key])
        if changed:
            plan["update"].append({"name": label, "changed": changed})
        else:
            plan["unchanged"].append(label)
    for config in plan["apps"]:
        for needed in config["depends_on"]:
            if needed not in seen and needed not in current:
                plan["errors"].append({"app": config["name"], "field": "depends_on",
                                       "message": "depends_on names %r, which is neither in the file nor running" % needed})
    plan["apps"] = dependencies_first(plan["apps"])
    if prune:
        plan["delete"] = [name for name, config in sorted(current.items())
                          if name not in seen and config.get("origin") == loaded.origin]
    return plan


def dependencies_first(apps: List[dict]) -> List[dict]:
    """The apps in file order, but each after the apps of the file it depends_on (the daemon
    refuses a dependency it does not know yet); a cycle keeps the file's order."""
    by_name = {app["name"]: app for app in apps}
    ordered: List[dict] = []
    placing: set = set()

    def place(app: dict) -> None:
        if app in ordered or app["name"] in placing:
            return
        placing.add(app["name"])
        for needed in app["depends_on"]:
            if needed in by_name:
                place(by_name[needed])
        ordered.append(app)
    for app in apps:
        place(app)
    return ordered


def print_plan(plan: dict, dry_run: bool) -> None:
    for text in plan["warnings"]:
        print("warning: %s" % text)
    for error in plan["errors"]:
        print("error: %s: %s" % (error["app"], error["message"]))
    if dry_run:
        for name in plan["create"]:
            print("create %s" % name)
        for entry in plan["update"]:
            print("update %s (%s)" % (entry["name"], ", ".join(entry["changed"])))
        for name in plan["unchanged"]:
            print("unchanged %s" % name)
        for name in plan["delete"]:
            print("delete %s" % name)


def read_plan_file(client: Optional[Client], args: argparse.Namespace) -> Tuple[AppsFile, dict]:
    try:
        loaded = load_apps_file(args.file, getattr(args, "env_name", None),
                                stub_missing=client is None or getattr(args, "dry_run", False))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CliError("cannot read %s: %s" % (args.file, getattr(exc, "strerror", None) or exc), 2) from None
    current, absent = {}, None
    if client is not None and getattr(args, "dry_run", False):
        client.may_start = False                # a dry run starts nothing, not even a daemon
        try:
            current = current_configs(client)
        except CliError:
            absent = "no daemon answers at %s: the plan is against an empty daemon" % client.address
    elif client is not None:
        current = current_configs(client)
    plan = apply_plan(loaded, current, getattr(args, "prune", False))
    if absent:
        plan["warnings"].insert(0, absent)
    return loaded, plan


def verb_apply(client: Client, args: argparse.Namespace) -> int:
    """Make the daemon run what the file says, converging: every app validated first (all
    errors listed, nothing done if any), then created, updated to exactly the file (a key
    left out goes back to its default) or left; --prune deletes what this file created."""
    loaded, plan = read_plan_file(client, args)
    dry_run = getattr(args, "dry_run", False)
    if args.json and (dry_run or plan["errors"]):
        print(json.dumps(dict(plan, dry_run=dry_run), indent=2))
    else:
        print_plan(plan, dry_run)
    if plan["errors"]:
        if not args.json:
            print("pmdaemon: nothing applied: %d error(s) in %s" % (len(plan["errors"]), args.file), file=sys.stderr)
        return 1
    if dry_run:
        return 0
    for config in plan["apps"]:
        blocking = ("cwd",) if client.url else ("cwd", "user")    # a local daemon runs as we do
        problems = [text for text in file_problems(config) if text.startswith(blocking)]
        if problems:
            raise CliError("%s: %s; nothing applied" % (config["name"], problems[0]))
    failed, results = 0, []
    for config in plan["apps"]:
        code, said = apply_one(client, config, plan)
        failed += code
        results.append({"name": config["name"], "result": said})
        if not args.json:
            print("%s: %s" % (config["name"], said))
    for name in plan["delete"]:
        client.ok("DELETE", "/api/processes/" + quoted(name), timeout=ACTION_TIMEOUT)
        results.append({"name": name, "result": "deleted"})
        if not args.json:
            print("%s: deleted (created by %s, no longer in it)" % (name, args.file))
    if args.json:
        print(json.dumps({"success": not failed, "results": results, "warnings": plan["warnings"]}, indent=2))
    return 1 if failed else 0


def apply_one(client: Client, config: dict, plan: dict) -> Tuple[int, str]:
    name = config["name"]
    wanted_status = config.pop("status", None)
    if name in plan["unchanged"]:
        status, body, said = 200, {}, "unchanged"
    elif name not in plan["create"]:
        status, body = client.call("PATCH", "/api/processes/" + quoted(name), config, timeout=ACTION_TIMEOUT)
        said = body and {"unchanged": "unchanged", "saved": "updated", "scaled": "updated (scaled)",
                         "restarted": "updated (restarted)"}.get(body.get("applied"))
    else:
        status, body = client.call("POST", "/api/processes", config, timeout=ACTION_TIMEOUT)
        said = "created" if config.get("autostart", True) else "created (not started)"
        if status < 300 and body["process"]["status"] == "errored":
            status, said = 422, None
            body = {"error": {"message": body["message"], "code": "START_FAILED"}}
    if status >= 300:
        return 1, error_text(body, status)
    if wanted_status in ("online", "stopped") and name not in plan["create"]:
        client.call("POST", "/api/processes/%s/%s" % (quoted(name), "start" if wanted_status == "online" else "stop"),
                    timeout=ACTION_TIMEOUT)
    return 0, said


def verb_convert(client: Optional[Client], args: argparse.Namespace) -> int:
    """Print a PM2 or supervisord file as our native JSON (warnings on stderr); nothing runs."""
    loaded, plan = read_plan_file(None, args)
    for text in plan["warnings"]:
        print("warning: %s" % text, file=sys.stderr)
    if plan["errors"]:
        for error in plan["errors"]:
            print("error: %s: %s" % (error["app"], error["message"]), file=sys.stderr)
        return 1
    defaults = ProcessConfig(name="x", script="x").to_dict()
    apps = [{key: value for key, value in app.items() if key in ("name", "script") or
             (key != "origin" and value != defaults[key])} for app in plan["apps"]]
    print(json.dumps({NATIVE_MARK: 1, "apps": apps}, indent=2))
    return 0


def dump_path(client: Client, args: argparse.Namespace) -> str:
    return os.path.abspath(args.file or os.path.join(client.home, DUMP_NAME))


def verb_save(client: Client, args: argparse.Namespace) -> int:
    """Write every process's settings and status to a file that `resurrect` restores exactly."""
    apps, groups = [], set()
    for entry in all_processes(client):
        details = client.ok("GET", "/api/processes/" + quoted(entry["name"]))
        config = details["config"]
        if config["name"] in groups:
            continue
        groups.add(config["name"])
        if details["port"] is not None:
            config["env"].pop("PORT", None)         # injected, not configured
        running = entry["status"] not in ("stopped", "errored")
        apps.append(dict(config, autostart=running, status="online" if running else "stopped"))
    path = dump_path(client, args)
    atomic_write(path, json.dumps({NATIVE_MARK: 1, "apps": apps}, indent=1).encode())
    print(json.dumps({"success": True, "saved": len(apps), "file": path}) if args.json
          else "saved %d process(es) to %s" % (len(apps), path))
    return 0


def verb_resurrect(client: Client, args: argparse.Namespace) -> int:
    args.file, args.prune = dump_path(client, args), False
    if not os.path.exists(args.file):
        raise CliError("nothing to resurrect: %s does not exist (see `pmdaemon.py save`)" % args.file)
    return verb_apply(client, args)


# -- boot: startup ------------------------------------------------------------------------------

def web_command(home: str, *extra: str) -> str:
    """The command line that runs this home's daemon with the options it last ran with."""
    return " ".join(shlex.quote(part) for part in (sys.executable, source_path(), "web", "--home", home)
                    + extra + tuple(recorded_web_options(home)))


def systemd_unit(home: str, user: str) -> str:
    """A unit that runs this file's daemon for this home under systemd."""
    return ("[Unit]\nDescription=pmdaemon process manager (home %s)\nAfter=network-online.target\n"
            "Wants=network-online.target\n\n[Service]\nType=notify\nNotifyAccess=main\nUser=%s\n"
            "Environment=PMDAEMON_HOME=%s\nExecStart=%s\n"
            "# `systemctl reload`: upgrade in place (the pmdaemon.py on disk); the processes keep running.\n"
            "ExecReload=/bin/kill -USR2 $MAINPID\nRestart=on-failure\nRestartSec=2\n"
            "# pmdaemon stops its children itself (process groups, kill_timeout): systemd only\n"
            "# signals the daemon, and gives it time.\nKillMode=process\nTimeoutStopSec=120\n"
            "# cgroup v2 limits (memory_limit, cpu_limit) need the subtree delegated to the daemon.\n"
            "Delegate=yes\nWatchdogSec=30\n\n[Install]\nWantedBy=multi-user.target\n"
            % (home, user, home, web_command(home, "--quiet")))


def verb_startup(client_args: argparse.Namespace) -> int:
    home = client_home(client_args)
    user = pwd_name(os.getuid())
    unit = systemd_unit(home, user)
    name = "pmdaemon-%s.service" % re.sub(r"[^A-Za-z0-9_.-]", "-", user)
    if not os.path.isdir("/run/systemd/system"):
        cron = "@reboot " + web_command(home, "--daemonize")
        print("This machine does not run systemd. To start pmdaemon at boot, add this line to the\n"
              "crontab of %s (crontab -e):\n\n%s\n" % (user, cron))
        return 1 if client_args.install else 0
    if not client_args.install:
        print("# %s: write it to /etc/systemd/system/%s, then\n# systemctl daemon-reload && "
              "systemctl enable --now %s\n# (or run `pmdaemon.py startup --install` as root)\n" % (name, name, name))
        print(unit, end="")
        return 0
    if os.geteuid() != 0:
        raise CliError("--install writes /etc/systemd/system/%s: run it as root (sudo), or without "
                       "--install to print the unit" % name)
    path = os.path.join("/etc/systemd/system", name)
    with open(path, "w") as handle:
        handle.write(unit)
    for command in (["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", name]):
        if subprocess.run(command).returncode:
            raise CliError("`%s` failed; the unit is in %s" % (" ".join(command), path))
    print("installed and started %s" % path)
    return 0


def verb_kill(client_args: argparse.Namespace) -> int:
    """Stop the home's daemon gracefully (pm2 kill): children stopped, state saved."""
    home = client_home(client_args)
    pid = running_daemon(home)
    if pid is None:
        print("no daemon is running for %s" % home)
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + KILL_WAIT_TIMEOUT
    while time.monotonic() < deadline:
        if running_daemon(home) is None and has_exited(pid):
            print("stopped the daemon (pid %d) and its processes" % pid)
            return 0
        time.sleep(0.05)
    raise CliError("the daemon (pid %d) is still stopping after %d s" % (pid, KILL_WAIT_TIMEOUT))


def has_exited(pid: int) -> bool:
    """True once pid is gone or a zombie: it has exited and only its parent's reap is left. (A
    background daemon's parent is init, and some containers' init reaps late.)"""
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return True


def catches_signal(pid: int, signum: int) -> bool:
    """Whether the process has a handler for signum (SigCgt in /proc/PID/status)."""
    try:
        with open("/proc/%d/status" % pid) as handle:
            caught = next(line for line in handle if line.startswith("SigCgt:")).split()[1]
    except (OSError, StopIteration, IndexError):
        return False
    return bool(int(caught, 16) >> (signum - 1) & 1)


def verb_upgrade(client_args: argparse.Namespace) -> int:
    """Replace the home's daemon in place (SIGUSR2) by the pmdaemon.py now on disk, with new
    web options if given: its processes keep running; prints the reason when it refuses."""
    home = client_home(client_args)
    pid = running_daemon(home)
    if pid is None:
        raise CliError("no daemon is running for %s" % home)
    if not catches_signal(pid, signal.SIGUSR2):
        # A daemon older than upgrades would die of the signal, leaving its apps orphaned.
        raise CliError("the daemon (pid %d) cannot upgrade itself (it predates upgrades): stop it with "
                       "`kill` once, and the next command starts the new one" % pid)
    options = shlex.split(client_args.web) if client_args.web is not None else None
    request_id = os.urandom(8).hex()
    result_path = os.path.join(home, UPGRADE_RESULT_NAME)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(result_path)
    atomic_write(os.path.join(home, UPGRADE_REQUEST_NAME), json_bytes({"id": request_id, "web": options}))
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + UPGRADE_WAIT_TIMEOUT
    while time.monotonic() < deadline:
        result = read_private_json(result_path)
        if result is not None and result.get("id") == request_id:
            if not result.get("upgraded"):
                raise CliError("upgrade refused: %s" % result.get("reason"))
            print("upgraded the daemon in place (pid %d); its processes kept running" % pid)
            return 0
        if has_exited(pid):
            raise CliError("the daemon (pid %d) exited during the upgrade (see %s)"
                           % (pid, os.path.join(home, "pmdaemon.log")))
        time.sleep(0.02)
    raise CliError("the daemon (pid %d) did not finish the upgrade within %d s" % (pid, UPGRADE_WAIT_TIMEOUT))


def pwd_name(uid: int) -> str:
    try:
        import pwd
        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


# -- monit: a live terminal view over the WebSocket ---------------------------------------------

class MonitView:
    """What `monit` shows, kept from WebSocket messages: processes, system, the selected
    process's last lines. Drawing is separate (draw_monit), so this part is plain data."""

    def __init__(self):
        self.processes: Dict[str, dict] = {}
        self.system: dict = {}
        self.selected = 0
        self.scroll = 0
        self.logs: List[dict] = []
        self.status = "q quit  up/down select  r restart  s stop  S start  PgUp/PgDn scroll logs"

    def apply(self, message: dict) -> None:
        kind, data = message["type"], message["data"]
        if kind == "process_update":
            data["seen"] = time.monotonic()     # a quiet process is not repeated each tick
            self.processes[data["name"]] = data
        elif kind == "system_update":
            self.system = data
        elif kind == "process_event" and data["event"] == "deleted":
            self.processes.pop(data["process"], None)
        elif kind == "log" and data["process"] == self.selected_name():
            self.logs = (self.logs + [data])[-MONIT_LOG_LINES:]

    def ordered(self) -> List[dict]:
        """The processes by id, an online one's uptime run on since its last update."""
        now = time.monotonic()
        return [dict(entry, uptime=entry["uptime"] + (int((now - entry["seen"]) * 1000)
                                                      if entry["status"] == "online" and "seen" in entry else 0))
                for entry in sorted(self.processes.values(), key=lambda entry: entry["id"])]

    def selected_name(self) -> Optional[str]:
        ordered = self.ordered()
        if not ordered:
            return None
        self.selected = max(0, min(self.selected, len(ordered) - 1))
        return ordered[self.selected]["name"]


def draw_monit(screen, view: MonitView) -> None:
    import curses
    screen.erase()
    height, width = screen.getmaxyx()

    def put(row: int, text: str, attribute: int = 0) -> None:
        if 0 <= row < height:
            with contextlib.suppress(curses.error):
                screen.addnstr(row, 0, text.ljust(width), max(0, width - 1), attribute)
    system = view.system
    memory = system.get("memory") or {}
    load = system.get("load") or {}
    put(0, "pmdaemon monit  cpu %5.1f%%  mem %5.1f%%  load %s" % (
        system.get("cpu", 0.0), memory.get("usage_percent", 0.0),
        " ".join("%.2f" % load.get(key, 0.0) for key in ("one", "five", "fifteen"))), curses.A_BOLD)
    put(1, "  ".join(column.ljust(size) for column, size in zip(TABLE_COLUMNS[:9], MONIT_WIDTHS)), curses.A_UNDERLINE)
    selected = view.selected_name()
    ordered = view.ordered()
    for index, row in enumerate(process_rows([dict(entry, health=entry.get("health", "")) for entry in ordered])):
        line = "  ".join(cell[:size].ljust(size) for cell, size in zip(row[:9], MONIT_WIDTHS))
        put(2 + index, line, curses.A_REVERSE if ordered[index]["name"] == selected else 0)
    top = 3 + len(ordered)
    put(top, "-- %s --" % (selected or "no processes"), curses.A_BOLD)
    room = max(0, height - top - 2)
    view.scroll = max(0, min(view.scroll, max(0, len(view.logs) - room)))
    end = len(view.logs) - view.scroll
    for offset, entry in enumerate(view.logs[max(0, end - room):end]):
        text = TERMINAL_CONTROL_RE.sub(lambda match: repr(match.group())[1:-1], entry["message"])
        put(top + 1 + offset, "%s %s" % (entry["type"][3:], text))
    put(height - 1, view.status, curses.A_DIM)
    screen.refresh()


def monit_key(client: Client, stream: WsClient, view: MonitView, key: int) -> bool:
    """Act on a key; False to quit."""
    import curses
    name = view.selected_name()
    if key in (ord("q"), 27):
        return False
    if key in (curses.KEY_UP, ord("k")):
        view.selected -= 1
    elif key in (curses.KEY_DOWN, ord("j")):
        view.selected += 1
    elif key == curses.KEY_PPAGE:
        view.scroll += 5
    elif key == curses.KEY_NPAGE:
        view.scroll -= 5
    elif name and key in (ord("r"), ord("s"), ord("S")):
        action = {ord("r"): "restart", ord("s"): "stop", ord("S"): "start"}[key]
        status, body = client.call("POST", "/api/processes/%s/%s" % (quoted(name), action), timeout=ACTION_TIMEOUT)
        view.status = "%s %s: %s" % (action, name, body.get("message") if status < 300 else error_text(body, status))
    if view.selected_name() != name:
        view.logs, view.scroll = [], 0
        switch_log_subscription(stream, name, view.selected_name())
    return True


def reconnect_ws(client: Client) -> WsClient:
    """A new WebSocket after the daemon closed ours with 1012 (an upgrade): the connection waits
    in the listen backlog until the new image serves it."""
    deadline = time.monotonic() + UPGRADE_WAIT_TIMEOUT
    while True:
        try:
            return WsClient(client)
        except (CliError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def switch_log_subscription(stream: WsClient, old: Optional[str], new: Optional[str]) -> None:
    if old:
        stream.send_json({"type": "unsubscribe", "channel": "logs", "process": old})
    if new:
        stream.send_json({"type": "subscribe", "channel": "logs", "process": new})


def verb_monit(client: Client, args: argparse.Namespace) -> int:
    import curses
    if args.json:
        raise CliError("monit is a terminal view; for JSON use `ls --json`, `logs --follow --json` or /ws", 2)
    if not sys.stdout.isatty():
        raise CliError("monit needs a terminal")
    client.ok("GET", "/api/system")          # reach (or start) the daemon before the screen changes
    stream = WsClient(client)

    def run(screen) -> int:
        nonlocal stream
        curses.curs_set(0)
        screen.nodelay(True)
        screen.keypad(True)
        view = MonitView()
        subscribed = None
        while True:
            readable, _, _ = select.select([stream, sys.stdin], [], [], 0.5)
            if stream in readable:
                try:
                    for message in stream.messages():
                        view.apply(message)
                except EOFError:
                    if stream.close_code != CloseCode.SERVICE_RESTART:
                        raise
                    stream.close()              # the daemon upgrades itself: it answers again soon
                    stream, subscribed = reconnect_ws(client), None
            if view.selected_name() != subscribed:
                switch_log_subscription(stream, subscribed, view.selected_name())
                subscribed = view.selected_name()
                view.logs = [dict(entry, process=subscribed) for entry in client.ok(
                    "GET", "/api/logs/%s?lines=%d" % (quoted(subscribed), MONIT_LOG_LINES))["logs"]] if subscribed else []
            key = screen.getch()
            while key != -1:
                if key == curses.KEY_RESIZE:
                    curses.update_lines_cols()
                elif not monit_key(client, stream, view, key):
                    return 0
                key = screen.getch()
            draw_monit(screen, view)
    try:
        return curses.wrapper(run)             # restores the terminal on any exit
    except EOFError:
        raise CliError("the daemon closed the connection") from None
    except KeyboardInterrupt:
        return 0
    finally:
        stream.close()


# -- argument parsing and main ------------------------------------------------------------------

def bounded(kind: Callable[[str], Any], low: float, high: float) -> Callable[[str], Any]:
    """An argparse type that also checks the range, so --port 70000 is a usage error."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a %s" % (text, "number" if kind is float else "whole number"))
        if not low <= value <= high:
            raise argparse.ArgumentTypeError("%s is not between %g and %g" % (text, low, high))
        return value
    return parse


# The numeric options of `web`: flag, type, lowest, highest, default, help.
WEB_NUMBER_OPTIONS = (
    ("--sample-interval", float, 0.05, 3600, SAMPLE_INTERVAL, "seconds between metric samples and WebSocket updates"),
    ("--max-connections", int, 1, 1_000_000, MAX_CONNECTIONS, "open connections at once"),
    ("--max-ws-clients", int, 0, 1_000_000, MAX_WS_CLIENTS, "WebSocket clients at once"),
    ("--ws-ping-interval", float, 0.1, 86400, WS_PING_INTERVAL, "seconds between pings to each WebSocket client"),
    ("--ws-pong-timeout", float, 0.1, 86400, WS_PONG_TIMEOUT,
     "close a WebSocket client (1008) that has not answered a ping within this"),
    ("--ws-slow-grace", float, 0, 86400, WS_SLOW_GRACE,
     "close a WebSocket client (1008) that stays this long behind its 1 MiB send buffer"),
    ("--header-timeout", float, 0.1, 3600, HEADER_TIMEOUT,
     "a request's header block must arrive within this, from its first byte; else 408"),
    ("--body-timeout", float, 0.1, 3600, BODY_TIMEOUT,
     "a request's body must arrive within this, from the end of its head; else 408"),
    ("--keepalive-timeout", float, 0.1, 3600, KEEPALIVE_TIMEOUT, "idle keep-alive connections are closed after this"),
    ("--max-body-memory", int, 1024, 1 << 40, MAX_BODY_MEMORY,
     "bytes that request bodies being received may hold, all connections together; above it 503"),
)

# verb: (function, help, how it takes a target: None, "one" name, "optional" name, "all" name|all)
VERBS = {
    "start": (verb_start, "start a program, a file of apps (as apply does), or a stopped process", None),
    "stop": (verb_action, "stop a process (its whole group), or all", "all"),
    "restart": (verb_action, "restart a process, or all", "all"),
    "reload": (verb_action, "restart a group one copy at a time (zero downtime), or all", "all"),
    "delete": (verb_action, "stop and remove a process, or all", "all"),
    "scale": (verb_scale, "change how many copies of a process run", None),
    "signal": (verb_signal, "send a signal (SIGUSR2, HUP, 10) to a process, or all", None),
    "send": (verb_send, "write TEXT (or what stdin holds) to a process's stdin", None),
    "describe": (verb_describe, "everything about one process, every setting included", "one"),
    "list": (verb_list, "the process table (alias: ls)", None),
    "info": (verb_info, "everything about one process", "one"),
    "system": (verb_system, "host cpu, memory and load", None),
    "logs": (verb_logs, "last lines of a process's logs, or of all; --follow for new ones", "optional"),
    "flush": (verb_flush, "empty the logs of a process, or of all", "optional"),
    "monit": (verb_monit, "a live terminal view: processes, system, logs; keys act", None),
    "apply": (verb_apply, "make the daemon run what a file of apps says: ours, PM2's (JSON, YAML, JS) "
              "or supervisord's", None),
    "convert": (verb_convert, "print a PM2 or supervisord file as our JSON (nothing runs)", None),
    "save": (verb_save, "write every process and its status to a file (default $PMDAEMON_HOME/dump.json)", None),
    "resurrect": (verb_resurrect, "bring back what `save` wrote, stopped ones stopped", None),
    "startup": (None, "print (or --install) a systemd unit that starts pmdaemon at boot", None),
    "kill": (None, "stop the home's daemon gracefully: its processes stop, their state is kept", None),
    "upgrade": (None, "replace the home's daemon in place by the pmdaemon.py on disk (SIGUSR2): its "
                "processes keep running", None),
}


def add_global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """Options every verb takes, before or after it (defaults only on the top parser, so a
    value given before the verb is not reset by the verb's own parser)."""
    default = (lambda value: value) if defaults else (lambda value: argparse.SUPPRESS)
    parser.add_argument("--url", default=default(None), help="daemon URL (default: $%s, else the Unix socket "
                        "of the home)" % URL_ENV)
    parser.add_argument("--home", default=default(None), help="the daemon's home (default $%s or %s)"
                        % (HOME_ENV, DEFAULT_HOME))
    parser.add_argument("--api-key-file", default=default(None), metavar="FILE",
                        help="read the API key from FILE (default: $%s)" % API_KEY_ENV)
    parser.add_argument("--json", action="store_true", default=default(False), help="print the raw JSON")
    parser.add_argument("--no-daemon", action="store_true", default=default(False),
                        help="do not start a daemon when none runs")
    parser.add_argument("--timeout", type=bounded(float, 0.1, 86400), default=default(CLI_TIMEOUT),
                        metavar="SECONDS", help="for answers that should be quick (default %g)" % CLI_TIMEOUT)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pmdaemon.py", description="Process manager with a REST + WebSocket API "
        "(PMDaemon Web API), standard library only. Exit status: 0 done, 1 refused or failed, 2 usage.")
    parser.add_argument("--version", action="version", version="pmdaemon.py " + __version__)
    add_global_options(parser, defaults=True)
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    add_global_options(common, defaults=False)
    web = verbs.add_parser("web", help="run the daemon and its web API", parents=[common],
                           description="Run the daemon: supervise processes, serve REST and WebSocket.")
    add_web_options(web)
    for verb, (_, text, target) in VERBS.items():
        sub = verbs.add_parser(verb, help=text, description=text, parents=[common],
                               aliases=["ls"] if verb == "list" else [])
        if target == "all":
            sub.add_argument("target", metavar="NAME|ID|all")
        elif target in ("one", "optional"):
            sub.add_argument("name", metavar="NAME_OR_ID", nargs="?" if target == "optional" else None)
        add_verb_options(verb, sub)
    return parser


def add_verb_options(verb: str, sub: argparse.ArgumentParser) -> None:
    if verb == "start":
        sub.add_argument("target", metavar="SCRIPT|FILE|NAME", help="a program (a file runs through its "
                         "interpreter when not executable), a .json/.toml file of apps, or a process")
        sub.add_argument("script_args", nargs="*", metavar="ARG", help="arguments for the program (after --)")
        sub.add_argument("--name", help="the process name (default: the script's name)")
        sub.add_argument("-i", "--instances", metavar="N", help="copies to run: a number, max (one per CPU), "
                         "0 (the same) or -1 (CPUs less one)")
        sub.add_argument("--port", help="a port, a range A-B, auto or auto:A-B")
        sub.add_argument("--cwd", help="working directory (default: the current one)")
        sub.add_argument("-e", "--env", action="append", metavar="KEY=VALUE", help="environment (repeatable)")
        sub.add_argument("--max-memory", metavar="SIZE", help="restart above this RSS, e.g. 150M")
        sub.add_argument("--health-url", metavar="URL", help="an HTTP health check ({port} is replaced)")
        sub.add_argument("--wait-ready", action="store_true", help="starting until the health check passes")
        sub.add_argument("--max-memory-restart", dest="max_memory", metavar="SIZE", help="the same as --max-memory")
        sub.add_argument("--watch", nargs="?", const=True, metavar="PATH", help="restart when files change "
                         "(the cwd, or PATH)")
        sub.add_argument("--cron", "--cron-restart", dest="cron", metavar="EXPR", help="restart on a cron schedule")
        sub.add_argument("--namespace", help="the process's namespace")
        sub.add_argument("--user", help="run as this user (the daemon must be root)")
        sub.add_argument("--interpreter", help="run the script with this (node, python3, bash, ...), kept as given")
        sub.add_argument("--no-autorestart", action="store_true", help="do not restart when it exits")
        sub.add_argument("-o", "--output", metavar="FILE", help="stdout log file")
        sub.add_argument("--error", metavar="FILE", help="stderr log file")
        sub.add_argument("--force", action="store_true", help="replace the program of an existing NAME")
        sub.add_argument("--prune", action="store_true", help=argparse.SUPPRESS)
        sub.add_argument("--dry-run", action="store_true", help="with a file: print the plan, change nothing")
        sub.add_argument("--env-name", "--only-env", dest="env_name", metavar="NAME",
                         help="with a file: merge each app's env_NAME block")
    elif verb == "signal":
        sub.add_argument("signal", metavar="SIGNAL", help="a name (SIGUSR2, USR2) or number")
        sub.add_argument("target", metavar="NAME|ID|all")
    elif verb == "send":
        sub.add_argument("name", metavar="NAME")
        sub.add_argument("text", nargs="*", metavar="TEXT", help="a line to send; without it, stdin is sent")
    elif verb == "scale":
        sub.add_argument("name", metavar="NAME")
        sub.add_argument("count", type=bounded(int, 1, MAX_INSTANCES), metavar="N")
    elif verb == "logs":
        sub.add_argument("--lines", "-n", type=bounded(int, 0, MAX_LOG_REQUEST_LINES), default=20)
        sub.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
        which = sub.add_mutually_exclusive_group()
        which.add_argument("--err", action="store_true", help="stderr only")
        which.add_argument("--out", action="store_true", help="stdout only")
    elif verb in ("apply", "convert", "save", "resurrect"):
        sub.add_argument("file", nargs=None if verb in ("apply", "convert") else "?",
                         help="ours (.json), PM2's (.json, .yml, .js/.cjs/.mjs), supervisord's (.conf, .ini), "
                         "or .toml with Python 3.11+")
        if verb in ("apply", "convert"):
            sub.add_argument("--env", dest="env_name", metavar="NAME", help="merge each app's env_NAME block")
        if verb == "apply":
            sub.add_argument("--prune", action="store_true", help="delete processes that this file created "
                             "and no longer names")
            sub.add_argument("--dry-run", action="store_true", help="print the plan and every warning, change nothing")
    elif verb == "startup":
        sub.add_argument("--install", action="store_true", help="write and enable the unit (root)")
    elif verb == "upgrade":
        sub.add_argument("--web", metavar="OPTIONS", help="new web options instead of the current ones, "
                         "e.g. --web '--port 9700 --max-connections 500'")


def add_web_options(web: argparse.ArgumentParser) -> None:
    port = bounded(int, 0, 65535)
    web.add_argument("--port", type=port, default=port(os.environ.get(PORT_ENV, str(DEFAULT_PORT))),
                     help="port to bind (default $%s or %d; 0 = any free port)" % (PORT_ENV, DEFAULT_PORT))
    web.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default %(default)s); "
                     "a non-loopback address requires an API key")
    web.add_argument("--api-key", help="API key required on every /api request and /ws handshake "
                     "(default: $%s); prefer the variable or --api-key-file, since arguments are "
                     "visible to other users in ps" % API_KEY_ENV)
    web.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS and WSS with this certificate (PEM, "
                     "chain included); re-read on SIGUSR1")
    web.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    web.add_argument("--read-key-file", action="append", default=[], metavar="FILE",
                     help="a key that may read (GETs, /metrics, /ws) but not act (repeatable)")
    web.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                     help="also accept this Host name without an API key (repeatable)")
    web.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                     help="also allow this browser Origin, e.g. https://dash.example (repeatable)")
    for flag, kind, low, high, default, text in WEB_NUMBER_OPTIONS:
        web.add_argument(flag, type=bounded(kind, low, high), default=default,
                         metavar="SECONDS" if kind is float else "N", help=text + " (default %(default)s)")
    web.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    web.add_argument("--daemonize", action="store_true", help="run in the background; print its pid")
    web.add_argument("--quiet", action="store_true", help="log to $PMDAEMON_HOME/pmdaemon.log only, not stderr")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after "--" belongs to the program being started (argparse's handling of "--"
    # inside a subcommand differs between Python versions, so it is split off here).
    program_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(argv)
    if program_args:
        if getattr(args, "script_args", None) is None:
            build_parser().error("arguments after -- go with `start`")
        args.script_args = list(args.script_args) + program_args
    verb = "list" if args.verb == "ls" else args.verb
    if verb is None:
        build_parser().print_help()
        return 2
    try:
        if verb == "web":
            return command_web(args)
        if verb == "startup":
            return verb_startup(args)
        if verb == "kill":
            return verb_kill(args)
        if verb == "upgrade":
            return verb_upgrade(args)
        if verb == "convert":
            return verb_convert(None, args)
        args.verb = verb
        return VERBS[verb][0](Client(args), args)
    except CliError as exc:
        if getattr(args, "json", False):         # --json: the error as JSON too, on stdout
            print(json.dumps({"success": False, "error": {"code": "CLI_ERROR" if exc.status == 1 else "USAGE",
                                                          "message": exc.message}}))
        print("pmdaemon: %s" % exc.message, file=sys.stderr)
        return exc.status
    except BrokenPipeError:
        # `pmdaemon.py ls | head`: the reader is gone; say nothing, and keep the interpreter
        # from complaining when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run from the code cache, sys.path[0] is the home (private, checked): the file imports
    # nothing from beside itself, so the directory it was copied to is never searched again.
    sys.exit(main())

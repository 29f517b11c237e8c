"""Run a generated job_submit.lua outside slurmctld, in Lua 5.1 loaded with
ctypes (liblua5.1 is what Slurm's job_submit/lua links against on Debian 12),
with a stand-in for Slurm's ``slurm`` table. Lets the tests put the same
submissions through rules.py and through the Lua."""

from __future__ import annotations

import ctypes
import ctypes.util

from slurm_singularity.policy.render import lua_literal
from slurm_singularity.policy.rules import Submission

_LIB_NAMES = ("liblua5.1.so.0", "liblua5.1.so")

#: Stand-in for the parts of Slurm's ``slurm`` table job_submit.lua uses.
_PRELUDE = r'''
__messages = {}
slurm = {SUCCESS = 0, ERROR = -1, FAILURE = -1, ESLURM_ACCESS_DENIED = 2010,
         ESLURM_INVALID_ACCOUNT = 2045, ESLURM_ACCOUNTING_POLICY = 2050}
function slurm.log_user(fmt, ...) table.insert(__messages, string.format(fmt, ...)) end
function slurm.log_info(fmt, ...) end
function slurm.log_error(fmt, ...) end
function slurm.log_debug(fmt, ...) end
'''

_CALL = r'''
local desc = %s
local env = {}
desc.environment = env
local rc = slurm_job_submit(desc, {}, 0)
local out = {"rc=" .. rc}
for _, m in ipairs(__messages) do table.insert(out, "msg=" .. m) end
for _, k in ipairs({"partition", "requeue", "admin_comment", "account", "max_nodes"}) do
  if desc[k] ~= nil then table.insert(out, k .. "=" .. tostring(desc[k])) end
end
local names = {}
for k, _ in pairs(env) do table.insert(names, k) end
table.sort(names)
for _, k in ipairs(names) do table.insert(out, "env." .. k .. "=" .. env[k]) end
return table.concat(out, "\n")
'''


def load_lua() -> ctypes.CDLL | None:
    for name in _LIB_NAMES:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    found = ctypes.util.find_library("lua5.1")
    return ctypes.CDLL(found) if found else None


class LuaError(RuntimeError):
    pass


def job_desc(sub: Submission) -> dict[str, object]:
    """The job_desc table Slurm would hand job_submit.lua for ``sub``."""
    spank = {}
    for i, (name, value) in enumerate(
            (n, v) for n, v in (("sla", sub.sla), ("elastic", sub.elastic),
                                ("world_size", sub.world_size), ("ckpt_dir", sub.ckpt_dir),
                                ("proxy", sub.proxy), ("deterministic", sub.deterministic),
                                ("transparent", sub.transparent))
            if v is not None):
        spank[i] = f"_SLURM_SPANK_OPTION_singularity_{name}={value}"
    desc: dict[str, object] = {k: getattr(sub, k) for k in (
        "account", "partition", "tres_per_job", "tres_per_node", "tres_per_socket",
        "tres_per_task", "min_nodes", "max_nodes", "num_tasks", "sockets_per_node",
        "default_account")
        if getattr(sub, k) is not None}
    if sub.user is not None:
        desc["user_name"] = sub.user
    if spank:
        desc["spank_job_env"] = spank
    if sub.batch:
        desc["script"] = "#!/bin/sh\ntrue\n"
    return desc


def _literal(desc: dict[str, object]) -> str:
    parts = []
    for k, v in desc.items():
        if k == "spank_job_env":
            inner = ", ".join(f"[{i}] = {lua_literal(s)}" for i, s in v.items())  # 0-indexed
            parts.append(f"spank_job_env = {{{inner}}}")
        else:
            parts.append(f"{k} = {lua_literal(v)}")
    return "{" + ", ".join(parts) + "}"


_MODIFY = r'''
local rc = slurm_job_modify(%s, %s, {}, %d)
return "rc=" .. rc .. "\n" .. table.concat(__messages, "\n")
'''


def run_job_modify(lib: ctypes.CDLL, script: str, desc: dict[str, object],
                   rec: dict[str, object], uid: int) -> tuple[int, str]:
    """Call slurm_job_modify; returns (rc, messages joined by newlines)."""
    text = eval_lua(lib, script, _MODIFY % (lua_literal(desc), lua_literal(rec), uid))
    head, _, messages = text.partition("\n")
    return int(head.split("=")[1]), messages


def run_job_submit(lib: ctypes.CDLL, script: str, sub: Submission) -> dict[str, object]:
    """Load ``script`` in a fresh Lua state, call slurm_job_submit with the
    job_desc of ``sub``; returns rc, messages, the fields it set and env."""
    text = eval_lua(lib, script, _CALL % _literal(job_desc(sub)))
    out: dict[str, object] = {"messages": [], "env": {}}
    for line in text.split("\n"):
        key, _, value = line.partition("=")
        if key == "msg":
            out["messages"].append(value)
        elif key.startswith("env."):
            out["env"][key[4:]] = value
        else:
            out[key] = value
    return out


def eval_lua(lib: ctypes.CDLL, script: str, call: str) -> str:
    """Run the prelude, ``script`` and ``call`` in a fresh Lua state; the
    string ``call`` returns."""
    lib.luaL_newstate.restype = ctypes.c_void_p
    lib.lua_tolstring.restype = ctypes.c_char_p
    lib.lua_tolstring.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    lib.luaL_loadbuffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                                    ctypes.c_char_p]
    lib.lua_pcall.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.luaL_openlibs.argtypes = [ctypes.c_void_p]
    lib.lua_close.argtypes = [ctypes.c_void_p]
    state = lib.luaL_newstate()
    try:
        lib.luaL_openlibs(state)
        for chunk, name in ((_PRELUDE, b"prelude"), (script, b"job_submit.lua"),
                            (call, b"call")):
            data = chunk.encode()
            if lib.luaL_loadbuffer(state, data, len(data), name) != 0 or \
                    lib.lua_pcall(state, 0, 1, 0) != 0:
                raise LuaError(lib.lua_tolstring(state, -1, None).decode())
        return lib.lua_tolstring(state, -1, None).decode()
    finally:
        lib.lua_close(state)

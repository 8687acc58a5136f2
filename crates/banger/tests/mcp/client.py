"""An MCP client for `banger mcp`, built on the official MCP Python SDK (PyPI `mcp`; installed by
scripts/mcp-python). It starts `banger mcp` over stdio, as an MCP host does, and either runs the
end-to-end scenario of the real-guest test (`scenario`), or times `sandbox_exec` against
`banger vm exec` (`bench`). It prints one JSON report on stdout; the caller checks it.

Usage:
  client.py scenario BANGER IMAGE
  client.py bench BANGER VM RUNS
  client.py tools BANGER          (the tools' names and input schemas)

The daemon's paths come from BANGER_STATE_DIR, BANGER_SOCKET and BANGER_BANGERD, passed on to
the server (the SDK gives a server only a few safe variables of its own). Every call has a
deadline (anyio.fail_after).
"""

import json
import os
import statistics
import subprocess
import sys
import time

import anyio
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

PASSED = ("BANGER_STATE_DIR", "BANGER_SOCKET", "BANGER_BANGERD", "BANGER_AGENT", "PATH")

# Each call's deadline, in seconds: a boot under TCG on a loaded host takes tens of seconds.
CALL_DEADLINE = 300

HELLO = """\
import hashlib, sys
data = "".join(str(i) for i in range(1000)).encode()
with open("/root/out.txt", "w") as f:
    f.write("sha256 " + hashlib.sha256(data).hexdigest() + "\\n")
print("hello from", sys.version.split()[0])
"""


def server(banger):
    env = {k: os.environ[k] for k in PASSED if k in os.environ}
    return StdioServerParameters(command=banger, args=["mcp"], env=env)


async def call(session, name, args):
    """One tool call: {is_error, value (structured content), text}."""
    with anyio.fail_after(CALL_DEADLINE):
        result = await session.call_tool(name, args)
    text = "".join(getattr(c, "text", "") for c in result.content)
    return {"is_error": result.is_error, "value": result.structured_content, "text": text}


async def tool_list(session):
    """The tools' names and input schemas, by name."""
    with anyio.fail_after(60):
        listed = await session.list_tools()
    return sorted(({"name": t.name, "inputSchema": t.input_schema} for t in listed.tools), key=lambda t: t["name"])


async def tools(banger):
    async with stdio_client(server(banger)) as (read, write):
        async with ClientSession(read, write) as session:
            with anyio.fail_after(60):
                await session.initialize()
            return await tool_list(session)


async def scenario(banger, image):
    report = {}
    async with stdio_client(server(banger)) as (read, write):
        async with ClientSession(read, write) as session:
            with anyio.fail_after(60):
                init = await session.initialize()
            report["server"] = init.server_info.name
            report["tools"] = await tool_list(session)
            report["exec_missing"] = await call(session, "sandbox_exec", {"name": "nope", "command": ["true"]})
            report["create"] = await call(session, "sandbox_create", {"name": "mcp1", "image": image})
            report["write"] = await call(
                session, "fs_write", {"name": "mcp1", "path": "/root/hello.py", "content": HELLO}
            )
            report["run"] = await call(session, "sandbox_exec", {"name": "mcp1", "command": ["python3", "/root/hello.py"]})
            report["read"] = await call(session, "fs_read", {"name": "mcp1", "path": "/root/out.txt"})
            report["read_cut"] = await call(
                session, "fs_read", {"name": "mcp1", "path": "/root/out.txt", "max_bytes": 6}
            )
            report["read_b64"] = await call(
                session, "fs_read", {"name": "mcp1", "path": "/root/out.txt", "encoding": "base64"}
            )
            report["flood"] = await call(
                session,
                "sandbox_exec",
                {"name": "mcp1", "command": ["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x"], "max_output_bytes": 1000},
            )
            report["stdin"] = await call(
                session, "sandbox_exec", {"name": "mcp1", "command": ["wc", "-c"], "stdin": "12345"}
            )
            bg = await call(
                session, "sandbox_exec", {"name": "mcp1", "command": ["cat"], "stdin": "hello session\n", "background": True}
            )
            report["background"] = bg
            if not bg["is_error"]:
                # Until `cat` has copied its input and ended at its end.
                with anyio.fail_after(CALL_DEADLINE):
                    while True:
                        logs = await call(session, "session_logs", {"name": "mcp1", "session": bg["value"]["session"]})
                        if logs["is_error"] or logs["value"]["status"] in ("exited", "failed"):
                            break
                        await anyio.sleep(0.1)
                report["background_logs"] = logs
            report["fork"] = await call(session, "sandbox_fork", {"name": "mcp1", "new_name": "mcp2"})
            report["fork_read"] = await call(session, "sandbox_exec", {"name": "mcp2", "command": ["cat", "/root/out.txt"]})
            report["delete_fork"] = await call(session, "sandbox_delete", {"name": "mcp2"})
            report["delete"] = await call(session, "sandbox_delete", {"name": "mcp1"})
            report["list"] = await call(session, "sandbox_list", {})
    report["cancelled_run"] = await cancelled_run(banger)
    return report


async def cancelled_run(banger):
    """A `sandbox_run` of a long command whose call is cancelled once its sandbox runs, and whose
    client then goes away: the server must delete the sandbox. Returns the run's sandbox name."""
    async with stdio_client(server(banger)) as (read, write):
        async with ClientSession(read, write) as session:
            with anyio.fail_after(60):
                await session.initialize()
            name = None
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, session, "sandbox_run", {"image": "minimal", "command": ["sleep", "600"]})
                with anyio.fail_after(CALL_DEADLINE):
                    while name is None:
                        listed = await call(session, "sandbox_list", {})
                        runs = [v["name"] for v in listed["value"]["sandboxes"] if v["name"].startswith("run-")]
                        running = [v for v in listed["value"]["sandboxes"] if v["name"] in runs and v["state"] == "running"]
                        if running:
                            name = running[0]["name"]
                        else:
                            await anyio.sleep(0.1)
                tg.cancel_scope.cancel()
    return name


def median_ms(samples):
    return round(statistics.median(samples) * 1000, 2)


async def bench(banger, vm, runs):
    """Alternates one `sandbox_exec true` on a live MCP session (A) with one `banger vm exec VM
    -- true` process (B), RUNS times each, on the same running VM."""
    mcp_s, cli_s = [], []
    env = {**os.environ}
    async with stdio_client(server(banger)) as (read, write):
        async with ClientSession(read, write) as session:
            with anyio.fail_after(60):
                await session.initialize()
            # One untimed call of each first: connections and caches warm.
            await call(session, "sandbox_exec", {"name": vm, "command": ["true"]})
            subprocess.run([banger, "vm", "exec", vm, "--no-stdin", "--", "true"], env=env, check=True, timeout=120)
            for _ in range(runs):
                start = time.perf_counter()
                r = await call(session, "sandbox_exec", {"name": vm, "command": ["true"]})
                mcp_s.append(time.perf_counter() - start)
                if r["is_error"] or r["value"]["exit_code"] != 0:
                    raise SystemExit(f"sandbox_exec failed: {r}")
                start = time.perf_counter()
                subprocess.run([banger, "vm", "exec", vm, "--no-stdin", "--", "true"], env=env, check=True, timeout=120)
                cli_s.append(time.perf_counter() - start)
    return {
        "runs": runs,
        "mcp_sandbox_exec_median_ms": median_ms(mcp_s),
        "cli_vm_exec_median_ms": median_ms(cli_s),
        "ratio_mcp_over_cli": round(statistics.median(mcp_s) / statistics.median(cli_s), 3),
        "mcp_ms": [round(s * 1000, 2) for s in mcp_s],
        "cli_ms": [round(s * 1000, 2) for s in cli_s],
    }


def main():
    if len(sys.argv) >= 4 and sys.argv[1] == "scenario":
        report = anyio.run(scenario, sys.argv[2], sys.argv[3])
    elif len(sys.argv) >= 3 and sys.argv[1] == "tools":
        report = anyio.run(tools, sys.argv[2])
    elif len(sys.argv) >= 5 and sys.argv[1] == "bench":
        report = anyio.run(bench, sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        raise SystemExit(__doc__)
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()

"""The peak memory of a conversion alone: a script whose `ru_maxrss` is the converter's own.

Run it as `python -c CONVERT SRC OUT TYPE`; its last stdout line is JSON with `peak_kib`,
`import_kib` (the peak after the imports), `seconds`, `written` and `total_bytes`.
"""

from __future__ import annotations

import textwrap

# Linux keeps a process's ru_maxrss across execve, and Python starts subprocesses with vfork+exec,
# so a child exec'd straight from pytest reports *pytest's* peak (over 1 GB right after generating
# the checkpoint) as its own. The script therefore forks once more before it does anything: a forked
# child starts with fresh rusage and a copy of a small interpreter, so its ru_maxrss is the
# converter's own peak, imports included.
CONVERT = textwrap.dedent("""
    import json, os, resource, sys, time
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            import quantize
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            t0 = time.perf_counter()
            result = quantize.convert(sys.argv[1], out=sys.argv[2], out_type=sys.argv[3])
            print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "import_kib": base,
                              "seconds": time.perf_counter() - t0, "written": result.written,
                              "total_bytes": result.total_bytes}))
            status = 0
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
""")

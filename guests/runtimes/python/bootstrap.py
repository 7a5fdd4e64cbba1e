# Kiln Python function bootstrap: runs once inside wizer.initialize (deploy); its state is snapshotted.
import os, sys, json, traceback, importlib.util
_stdout = sys.stdout            # the real stdout (fd 1): only the JSON result goes there
sys.stdout = sys.stderr         # print() in user code goes to the log
sys.__stdout__ = sys.stderr     # and print(file=sys.__stdout__) too (_stdout keeps the real one)
APP = "/app"
MAIN = os.environ.get("KILN_HANDLER", APP + "/main.py")   # Kiln names the entry file (deploy only)
sys.path[0:0] = [p for p in dict.fromkeys([os.path.dirname(MAIN), APP, APP + "/vendor"])]
_spec = importlib.util.spec_from_file_location("main", MAIN)
_mod = importlib.util.module_from_spec(_spec)
sys.modules["main"] = _mod
_spec.loader.exec_module(_mod)  # user top-level code runs here, at deploy
_handler = getattr(_mod, "handler")
_on_restore = getattr(_mod, "on_restore", None)
sys.stderr.flush()

def _kiln_restore():
    # Per fresh instance: anything seeded at deploy is shared by every instance; reseed it.
    r = sys.modules.get("random")
    if r is not None:
        r.seed()
    if _on_restore is not None:
        try:
            _on_restore()
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            return 1
    return 0

def _kiln_invoke():
    raw = sys.stdin.buffer.read()
    try:
        event = json.loads(raw) if raw.strip() else None
    except ValueError as e:
        sys.stderr.write("invalid JSON input: %s\n" % e)
        sys.stderr.flush()
        return 2
    try:
        out = json.dumps(_handler(event))
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        return 1
    _stdout.write(out)
    _stdout.write("\n")
    _stdout.flush()
    sys.stderr.flush()
    return 0

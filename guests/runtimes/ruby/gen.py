# Generates the WAT glue that turns ruby.wasm (reactor with the rb-abi-guest exports) into a Kiln
# function module: stubs for its JS-host imports, and wizer.initialize / kiln.restore / _start.
import re, subprocess, sys
src = sys.argv[1]
types = {}
for line in subprocess.run(["wasm-objdump", "-x", "-j", "Type", src], capture_output=True, text=True).stdout.splitlines():
    m = re.match(r"\s*- type\[(\d+)\] \((.*)\) -> (.*)", line)
    if m:
        params = [p.strip() for p in m.group(2).split(",") if p.strip()]
        res = m.group(3).strip()
        types[int(m.group(1))] = (params, [] if res == "nil" else [res])
imports = []
for line in subprocess.run(["wasm-objdump", "-x", "-j", "Import", src], capture_output=True, text=True).stdout.splitlines():
    m = re.match(r"\s*- func\[\d+\] sig=(\d+) <.*> <- ([^.]+)\.(.*)$", line)
    if m and m.group(2) != "wasi_snapshot_preview1":
        imports.append((m.group(2), m.group(3), types[int(m.group(1))]))

def sig(t):
    p, r = t
    return "".join(f" (param {x})" for x in p) + "".join(f" (result {x})" for x in r)

mods = {}
for mod, name, t in imports:
    if name.startswith("resource_new_") or name.startswith("resource_get_"):
        body = "local.get 0"            # handle = rep: the objects stay pinned; instances are short-lived
    elif name.startswith("resource_drop_"):
        body = ""
    else:
        body = "unreachable"            # JS interop: there is no JS host in Kiln
    mods.setdefault(mod, []).append(f'  (func (export "{name}"){sig(t)} {body})')
for mod, funcs in mods.items():
    open(f"stub-{mod}.wat", "w").write("(module\n" + "\n".join(funcs) + "\n)\n")

def store_string(data: bytes, gptr, glen):
    # allocate len bytes with cabi_realloc and store the bytes 8 at a time; keep (ptr, len) in globals
    out = [f"    (global.set {gptr} (call $realloc (i32.const 0) (i32.const 0) (i32.const 8) (i32.const {len(data) + 8})))",
           f"    (global.set {glen} (i32.const {len(data)}))"]
    padded = data + b"\0" * (8 - len(data) % 8)
    for off in range(0, len(padded), 8):
        v = int.from_bytes(padded[off:off + 8], "little", signed=True)
        out.append(f"    (i64.store offset={off} (global.get {gptr}) (i64.const {v}))")
    return "\n".join(out)

boot = open("bootstrap.rb", "rb").read()
args = [b"ruby.wasm\0", b"-EUTF-8\0", b"-e_=0\0"]
wat = ['''(module
  (import "ruby" "memory" (memory 0))
  (import "ruby" "cabi_realloc" (func $realloc (param i32 i32 i32 i32) (result i32)))
  (import "ruby" "ruby-init: func(args: list<string>) -> ()" (func $ruby_init (param i32 i32)))
  (import "ruby" "ruby-init-loadpath: func() -> ()" (func $ruby_init_loadpath))
  (import "ruby" "rb-eval-string-protect: func(str: string) -> tuple<handle<rb-abi-value>, s32>" (func $eval (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (global $s_ptr (mut i32) (i32.const 0)) (global $s_len (mut i32) (i32.const 0))
  (global $inv_ptr (mut i32) (i32.const 0)) (global $inv_len (mut i32) (i32.const 0))
  (global $res_ptr (mut i32) (i32.const 0)) (global $res_len (mut i32) (i32.const 0))
  (global $list (mut i32) (i32.const 0))
  (func $check (param $ret i32)
    ;; tuple<handle, s32>: a non-zero state means an uncaught Ruby exception / throw
    (if (i32.load offset=4 (local.get $ret)) (then (call $proc_exit (i32.const 70)))))
  (func (export "wizer.initialize")''']
wat.append(f"    (global.set $list (call $realloc (i32.const 0) (i32.const 0) (i32.const 4) (i32.const {8 * len(args)})))")
for i, a in enumerate(args):
    wat.append(store_string(a, "$s_ptr", "$s_len"))
    wat.append(f"    (i32.store offset={8*i} (global.get $list) (global.get $s_ptr))")
    wat.append(f"    (i32.store offset={8*i+4} (global.get $list) (global.get $s_len))")
wat.append(f"    (call $ruby_init (global.get $list) (i32.const {len(args)}))")
wat.append("    (call $ruby_init_loadpath)")
wat.append(store_string(boot, "$s_ptr", "$s_len"))
wat.append("    (call $check (call $eval (global.get $s_ptr) (global.get $s_len)))")
wat.append(store_string(b"Kiln.invoke", "$inv_ptr", "$inv_len"))
wat.append(store_string(b"Kiln.restore", "$res_ptr", "$res_len"))
wat.append("  )")
wat.append('''  (func (export "kiln.restore") (call $check (call $eval (global.get $res_ptr) (global.get $res_len))))
  (func (export "_start") (call $check (call $eval (global.get $inv_ptr) (global.get $inv_len))))
)''')
open("glue.wat", "w").write("\n".join(wat) + "\n")
print("stub modules:", list(mods), "imports stubbed:", len(imports))

//! The jailed microVM helper, for `kiln-vmm`'s own tests and examples: what `kiln vmm-jail` is
//! in the real server. See `kiln_vmm::jail`.

fn main() {
    kiln_vmm::jail::child_main()
}

//! Whether this host can run the microvm tier, decided once at start-up.
//!
//! Running a user's executable needs a Linux guest (kernel + initramfs with Kiln's guest agent) on
//! Kiln's VMM, and a Linux guest needs hardware virtualization: on a KVM without `vmx`/`svm` — a
//! nested PVM backend, as on Kiln's development machines — KVM emulates a non-PVM guest
//! instruction by instruction and Linux never finishes booting. It also needs the guest image
//! (`--microvm-kernel`, `--microvm-agent`), and a jailed helper process (`kiln vmm-jail`, see
//! `kiln_vmm::jail`) that can enter its namespaces and create a VM there: the server itself never
//! opens `/dev/kvm`, its helper's probe is the KVM check. Where any piece is missing the tier answers
//! `unavailable` with the reason, after the upload was validated (bad input is `invalid_code` on every
//! host, so a client learns about a broken upload before it learns about the host).

/// Whether this host can run the microvm tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capability {
    Available,
    Unavailable(String),
}

/// What the probe found, as plain facts (so the decision is testable without the host).
#[derive(Debug, Clone, Default)]
pub struct HostFacts<'a> {
    pub has_kvm: bool,
    pub cpuinfo: &'a str,
    pub pvm: bool,
    /// Why the guest image could not be loaded, if it could not.
    pub image_error: Option<String>,
    /// Why a jailed helper could not enter its jail or create a VM there, if it could not (its
    /// probe runs only where everything above says the tier could run).
    pub jail_error: Option<String>,
}

impl Capability {
    pub fn decide(facts: &HostFacts<'_>) -> Self {
        if !facts.has_kvm {
            return Self::Unavailable("the microvm tier needs KVM and this host has no /dev/kvm".into());
        }
        if !has_hardware_virtualization(facts.cpuinfo) {
            let backend = if facts.pvm {
                "the nested PVM backend"
            } else {
                "a backend"
            };
            return Self::Unavailable(format!(
                "the microvm tier is not available on this host: its KVM is {backend} without hardware \
                 virtualization (no vmx or svm CPU flag), which cannot boot the Linux guest that runs \
                 native executables"
            ));
        }
        if let Some(error) = &facts.image_error {
            return Self::Unavailable(format!(
                "the microvm tier is not available: this host has hardware virtualization, but the \
                 Linux guest image is not usable: {error}"
            ));
        }
        if let Some(error) = &facts.jail_error {
            return Self::Unavailable(format!(
                "the microvm tier is not available: its jailed VM helper cannot run a VM on this host: {error}"
            ));
        }
        Self::Available
    }

    pub fn is_available(&self) -> bool {
        matches!(self, Self::Available)
    }

    /// Why the tier cannot run here, if it cannot.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Self::Available => None,
            Self::Unavailable(reason) => Some(reason),
        }
    }
}

/// Whether the CPU flags show Intel VT-x or AMD-V.
pub fn has_hardware_virtualization(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|flag| flag == "vmx" || flag == "svm")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_capability_names_the_missing_piece() {
        let no_kvm = Capability::decide(&HostFacts::default());
        assert!(no_kvm.reason().unwrap().contains("no /dev/kvm"));
        let pvm = Capability::decide(&HostFacts {
            has_kvm: true,
            cpuinfo: "flags\t: fpu sse2 avx2 hypervisor\n",
            pvm: true,
            // The host's KVM comes first: an image does not make PVM boot Linux.
            image_error: None,
            ..Default::default()
        });
        let reason = pvm.reason().unwrap();
        assert!(reason.contains("PVM") && reason.contains("vmx"), "{reason}");
        let no_image = Capability::decide(&HostFacts {
            has_kvm: true,
            cpuinfo: "flags\t: fpu vmx sse2\n",
            image_error: Some("no guest kernel: start kiln with --microvm-kernel".into()),
            ..Default::default()
        });
        assert!(no_image.reason().unwrap().contains("--microvm-kernel"));
        assert!(!no_image.is_available());
        // The jail comes last (it is probed only where the rest says yes); its reason is named.
        let no_jail = Capability::decide(&HostFacts {
            has_kvm: true,
            cpuinfo: "flags\t: fpu vmx sse2\n",
            jail_error: Some("cannot use KVM: permission denied".into()),
            ..Default::default()
        });
        let reason = no_jail.reason().unwrap();
        assert!(
            reason.contains("jailed") && reason.contains("permission denied"),
            "{reason}"
        );
        let ready = Capability::decide(&HostFacts {
            has_kvm: true,
            cpuinfo: "processor\t: 0\nflags\t: fpu svm sse2\n",
            ..Default::default()
        });
        assert_eq!(ready, Capability::Available);
        assert_eq!(ready.reason(), None);
    }
}

//! The guest's network: a TUN interface, `kiln0`, whose IP packets the agent relays to the host as
//! PACKET frames. The host terminates them in a user-space TCP/IP stack under the sandbox's egress
//! policy (`kiln_netstack`), so no virtio device, no host network set-up and no guest driver
//! beyond the kernel's `tun` module (shipped in the initramfs as `/kiln/modules/tun.ko`).
//!
//! Set up once at boot, before the snapshot: a restored VM keeps its address and routes. The
//! addresses are QEMU's user-mode ones: the guest 10.0.2.15/24, everything routed to 10.0.2.2,
//! names resolved by 10.0.2.3 (Kiln's resolver, under the same policy).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

pub const INTERFACE: &str = "kiln0";
const GUEST: [u8; 4] = [10, 0, 2, 15];
const NETMASK: [u8; 4] = [255, 255, 255, 0];
const GATEWAY: [u8; 4] = [10, 0, 2, 2];
const DNS: &str = "10.0.2.3";
/// The interface's MTU: large, so that a TCP segment (and its frame to the host) carries 16 KiB.
pub const MTU: usize = 16384;
const MODULE: &str = "/kiln/modules/tun.ko";

/// `TUNSETIFF`, `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Brings `kiln0` up: loads the `tun` module, creates the interface, addresses it, routes
/// everything through it and points the resolver at Kiln. The TUN's descriptor, non-blocking.
pub fn up() -> io::Result<File> {
    load_module(MODULE)?;
    // SAFETY: a plain open of a device node; the descriptor is owned by the File below.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(annotate("open /dev/net/tun"));
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    let tun = unsafe { File::from_raw_fd(fd) };
    let mut ifreq = ifreq(INTERFACE);
    let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as i16;
    ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: `ifreq` is a 40-byte struct ifreq (name, then the flags) for the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, ifreq.as_mut_ptr()) } != 0 {
        return Err(annotate("TUNSETIFF"));
    }
    let socket = Socket::new()?;
    socket.set_address(libc::SIOCSIFADDR, GUEST)?;
    socket.set_address(libc::SIOCSIFNETMASK, NETMASK)?;
    socket.set_int(libc::SIOCSIFMTU, MTU as i32)?;
    socket.set_flags((libc::IFF_UP | libc::IFF_RUNNING) as i16)?;
    socket.default_route(GATEWAY)?;
    let _ = std::fs::create_dir_all("/etc");
    std::fs::write("/etc/resolv.conf", format!("nameserver {DNS}\n")).map_err(|e| with("/etc/resolv.conf", e))?;
    Ok(tun)
}

/// Loads a kernel module from a file (`finit_module`); already loaded is fine.
fn load_module(path: &str) -> io::Result<()> {
    let module = File::open(path).map_err(|e| with(path, e))?;
    let none = CString::default();
    // SAFETY: finit_module reads the module through the descriptor; the parameters are an empty
    // NUL-terminated string.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, module.as_raw_fd(), none.as_ptr(), 0) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(with(path, e));
        }
    }
    Ok(())
}

/// A struct ifreq (40 bytes) naming `name`.
fn ifreq(name: &str) -> [u8; 40] {
    let mut ifreq = [0u8; 40];
    ifreq[..name.len()].copy_from_slice(name.as_bytes());
    ifreq
}

/// A struct sockaddr_in of `address`, port 0.
fn sockaddr(address: [u8; 4]) -> libc::sockaddr {
    let inet = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(address),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain data.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) }
}

/// A datagram socket for the interface ioctls.
struct Socket(File);

impl Socket {
    fn new() -> io::Result<Socket> {
        // SAFETY: a plain socket, owned by the File.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(annotate("socket"));
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        Ok(Socket(unsafe { File::from_raw_fd(fd) }))
    }

    fn ioctl(&self, request: libc::c_ulong, ifreq: &mut [u8; 40], what: &str) -> io::Result<()> {
        // SAFETY: `ifreq` is a 40-byte struct ifreq the request reads or writes.
        if unsafe { libc::ioctl(self.0.as_raw_fd(), request as _, ifreq.as_mut_ptr()) } != 0 {
            return Err(annotate(what));
        }
        Ok(())
    }

    fn set_address(&self, request: libc::c_ulong, address: [u8; 4]) -> io::Result<()> {
        let mut ifreq = ifreq(INTERFACE);
        let addr = sockaddr(address);
        // SAFETY: a sockaddr is 16 bytes of plain data, copied into the ifreq's union.
        let bytes: [u8; 16] = unsafe { std::mem::transmute(addr) };
        ifreq[16..32].copy_from_slice(&bytes);
        self.ioctl(request, &mut ifreq, "setting kiln0's address")
    }

    fn set_int(&self, request: libc::c_ulong, value: i32) -> io::Result<()> {
        let mut ifreq = ifreq(INTERFACE);
        ifreq[16..20].copy_from_slice(&value.to_ne_bytes());
        self.ioctl(request, &mut ifreq, "setting kiln0's MTU")
    }

    fn set_flags(&self, flags: i16) -> io::Result<()> {
        let mut ifreq = ifreq(INTERFACE);
        ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
        self.ioctl(libc::SIOCSIFFLAGS, &mut ifreq, "bringing kiln0 up")
    }

    fn default_route(&self, gateway: [u8; 4]) -> io::Result<()> {
        let device = CString::new(INTERFACE).expect("no NUL");
        // SAFETY: rtentry is plain data; zero is a valid value for every field.
        let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
        route.rt_dst = sockaddr([0; 4]);
        route.rt_genmask = sockaddr([0; 4]);
        route.rt_gateway = sockaddr(gateway);
        route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        route.rt_dev = device.as_ptr() as *mut libc::c_char;
        // SAFETY: `route` is a complete rtentry; the device name outlives the call.
        if unsafe { libc::ioctl(self.0.as_raw_fd(), libc::SIOCADDRT as _, &route) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(with("adding the default route", e));
            }
        }
        Ok(())
    }
}

fn annotate(what: &str) -> io::Error {
    with(what, io::Error::last_os_error())
}

fn with(what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

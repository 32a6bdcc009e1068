//! Namespaces made through `clone` and `clone3` inside a job (x86_64 only).
//!
//! The busybox image has no tool that calls `clone` with namespace flags (its `unshare` calls
//! `unshare(2)`), so the test writes its own: a static ELF of a few instructions, no libc.

#![cfg(target_arch = "x86_64")]

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use crate::support::{collect, require_root, Env};

const T: Duration = Duration::from_secs(20);

/// A static x86_64 program that makes one system call `nr(arg0, 0, 0, 0, 0)` and exits with 0
/// in a child it made, 100 in the parent (a positive result), or the errno:
///
/// ```text
/// mov eax, nr; mov edi, arg0; xor esi, esi; xor edx, edx; xor r10d, r10d; xor r8d, r8d
/// syscall
/// mov edi, 100; test rax, rax; jg 1f; mov edi, eax; neg edi
/// 1: mov eax, 231 (exit_group); syscall
/// ```
fn probe(nr: i64, arg0: i32) -> Vec<u8> {
    let mut code = vec![0xb8];
    code.extend((nr as u32).to_le_bytes());
    code.push(0xbf);
    code.extend((arg0 as u32).to_le_bytes());
    code.extend([
        0x31, 0xf6, 0x31, 0xd2, 0x45, 0x31, 0xd2, 0x45, 0x31, 0xc0, 0x0f, 0x05,
    ]);
    code.extend([
        0xbf, 100, 0, 0, 0, 0x48, 0x85, 0xc0, 0x7f, 0x04, 0x89, 0xc7, 0xf7, 0xdf,
    ]);
    code.extend([0xb8, 231, 0, 0, 0, 0x0f, 0x05]);

    // One ELF header, one PT_LOAD program header mapping the whole file read+exec, the code.
    const BASE: u64 = 0x40_0000;
    const HEADERS: u64 = 64 + 56;
    let size = HEADERS + code.len() as u64;
    let mut elf = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    elf.extend(2u16.to_le_bytes()); // e_type: ET_EXEC
    elf.extend(62u16.to_le_bytes()); // e_machine: EM_X86_64
    elf.extend(1u32.to_le_bytes()); // e_version
    elf.extend((BASE + HEADERS).to_le_bytes()); // e_entry
    elf.extend(64u64.to_le_bytes()); // e_phoff
    elf.extend(0u64.to_le_bytes()); // e_shoff
    elf.extend(0u32.to_le_bytes()); // e_flags
    for half in [64u16, 56, 1, 0, 0, 0] {
        // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        elf.extend(half.to_le_bytes());
    }
    elf.extend(1u32.to_le_bytes()); // p_type: PT_LOAD
    elf.extend(5u32.to_le_bytes()); // p_flags: R|X
    for word in [0, BASE, BASE, size, size, 0x1000] {
        // p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
        elf.extend(word.to_le_bytes());
    }
    assert_eq!(elf.len() as u64, HEADERS);
    elf.extend(code);
    elf
}

#[tokio::test]
async fn clone_cannot_make_namespaces_but_fork_works() {
    require_root!();
    let env = Env::new("clone");
    let dir = env.base.join("probes");
    std::fs::create_dir_all(&dir).unwrap();
    let probes = [
        (
            "newuser",
            libc::SYS_clone,
            libc::CLONE_NEWUSER | libc::SIGCHLD,
        ),
        (
            "usernet",
            libc::SYS_clone,
            libc::CLONE_NEWUSER | libc::CLONE_NEWNET | libc::SIGCHLD,
        ),
        (
            "newpid",
            libc::SYS_clone,
            libc::CLONE_NEWPID | libc::SIGCHLD,
        ),
        // clone3(NULL, 0) is EINVAL when the kernel gets to look at it.
        ("clone3", libc::SYS_clone3, 0),
        ("fork", libc::SYS_clone, libc::SIGCHLD),
    ];
    for (name, nr, arg0) in probes {
        let path = dir.join(name);
        std::fs::write(&path, probe(nr, arg0)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut spec = env.spec(
        "clone",
        &[
            "sh",
            "-c",
            "for p in newuser usernet newpid clone3 fork; do /probes/$p; echo $p $?; done; \
             echo sub $(echo forked)",
        ],
    );
    spec.mounts = vec![flynn_container::BindMount {
        source: dir,
        target: "/probes".into(),
        readonly: true,
    }];
    let mut conn = env.spawn(&spec).await;
    let run = collect(&mut conn, T).await;
    let eperm = libc::EPERM.to_string();
    let enosys = libc::ENOSYS.to_string();
    assert_eq!(
        run.stdout,
        vec![
            format!("newuser {eperm}"),
            format!("usernet {eperm}"),
            format!("newpid {eperm}"),
            format!("clone3 {enosys}"),
            "fork 100".to_string(),
            "sub forked".to_string(),
        ],
        "{run:?}"
    );
    assert_eq!(run.exit_code(), Some(0), "{run:?}");
    env.cleanup_and_check(&spec);
}

use std::time::Instant;
#[repr(C)] struct Api { api: u64, features: u64, ioctls: u64 }
#[repr(C)] struct Reg { start: u64, len: u64, mode: u64, ioctls: u64 }
#[repr(C)] struct Cp { dst: u64, src: u64, len: u64, mode: u64, copy: i64 }
#[repr(C)] struct Cont { start: u64, len: u64, mode: u64, mapped: i64 }
fn main() {
    let huge = std::env::args().nth(1).unwrap() == "huge";
    let len: usize = 256 << 20;
    unsafe {
        let name = std::ffi::CString::new("img").unwrap();
        let fd = libc::memfd_create(name.as_ptr(), if huge { libc::MFD_HUGETLB } else { 0 });
        assert!(fd >= 0);
        assert_eq!(libc::ftruncate(fd, len as i64), 0);
        let w = libc::mmap(std::ptr::null_mut(), len, 3, libc::MAP_SHARED, fd, 0); let _ = 0;
        assert!(w != libc::MAP_FAILED);
        for i in (0..len).step_by(4096) { *((w as usize + i) as *mut u64) = i as u64 + 1; }
        if std::env::var_os("COPY").is_some() {
            for round in 0..4 {
                let dst = libc::mmap(std::ptr::null_mut(), len, 3, libc::MAP_PRIVATE, fd, 0);
                let u = libc::syscall(323, libc::O_CLOEXEC | libc::O_NONBLOCK) as i32;
                let mut api = Api { api: 0xAA, features: if huge { 1 << 9 } else { 1 << 10 }, ioctls: 0 };
                assert_eq!(libc::ioctl(u, 0xC018AA3F, &mut api), 0);
                let mut reg = Reg { start: dst as u64, len: len as u64, mode: 1 | 4, ioctls: 0 };
                assert_eq!(libc::ioctl(u, 0xC020AA00, &mut reg), 0);
                let threads: usize = std::env::var("T").map(|s| s.parse().unwrap()).unwrap_or(1);
                let t = Instant::now();
                let (d, ww) = (dst as usize, w as usize);
                std::thread::scope(|sc| for k in 0..threads { sc.spawn(move || {
                    let per = len / threads;
                    let mut off = k * per;
                    while off < (k + 1) * per {
                        let mut c = Cp { dst: (d + off) as u64, src: (ww + off) as u64, len: 2 << 20, mode: 0, copy: 0 };
                        let r = libc::ioctl(u, 0xC028AA03u64 as _, &mut c);
                        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
                        off += 2 << 20;
                    }
                });});
                let ct = t.elapsed();
                println!("copy T={threads} round {round}: {:?} ({:.1} GB/s)", ct, len as f64 / ct.as_secs_f64() / 1e9);
                libc::close(u);
                libc::munmap(dst, len);
            }
        }
        libc::munmap(w, len);
        if std::env::var_os("COPY").is_some() { return; }
        for round in 0..4 {
            let dst = libc::mmap(std::ptr::null_mut(), len, 3, libc::MAP_PRIVATE, fd, 0);
            let u = libc::syscall(323, libc::O_CLOEXEC | libc::O_NONBLOCK) as i32;
            let mut api = Api { api: 0xAA, features: if huge { 1 << 9 } else { 1 << 10 }, ioctls: 0 };
            assert_eq!(libc::ioctl(u, 0xC018AA3F, &mut api), 0);
            let mut reg = Reg { start: dst as u64, len: len as u64, mode: 1 | 4, ioctls: 0 };
            assert_eq!(libc::ioctl(u, 0xC020AA00, &mut reg), 0, "{}", std::io::Error::last_os_error());
            let t = Instant::now();
            let step: usize = std::env::var("STEP").map(|s| s.parse().unwrap()).unwrap_or(len);
            let mut off = 0;
            while off < len {
                let mut c = Cont { start: dst as u64 + off as u64, len: step as u64, mode: 0, mapped: 0 };
                let r = libc::ioctl(u, 0xC020AA07, &mut c);
                assert_eq!(r, 0, "{} {}", std::io::Error::last_os_error(), c.mapped);
                off += step;
            }
            let ct = t.elapsed();
            let t = Instant::now();
            let mut s = 0u64;
            for i in (0..len).step_by(4096) { s += std::ptr::read_volatile((dst as usize + i) as *const u64); }
            let tt = t.elapsed();
            println!("{} round {round}: continue {:?} ({:.1} GB/s) touch {:?} sum {s}", if huge {"huge"} else {"4k"}, ct, len as f64 / ct.as_secs_f64() / 1e9, tt);
            libc::close(u);
            libc::munmap(dst, len);
        }
    }
}

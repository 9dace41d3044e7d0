use std::sync::Arc;
use std::time::Instant;
use std::os::fd::AsRawFd;
use apf::{Engine, GuestAddress, GuestRam, Image, SnapshotFile, Config};

fn touch(base: usize, pages: u64, write: bool, random: bool) -> f64 {
    let per = pages / 2;
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..2u64 {
            s.spawn(move || {
                let mut sum = 0u64;
                for i in 0..per {
                    let p = t * per + if random { agent_proto::permute(i, per, 7 ^ t) } else { i };
                    let addr = (base + (p * 4096) as usize) as *mut u64;
                    unsafe { if write { std::ptr::write_volatile(addr, p) } else { sum = sum.wrapping_add(std::ptr::read_volatile(addr)) } }
                }
                std::hint::black_box(sum);
            });
        }
    });
    start.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::Path::new(&args[1]);
    let mode = args[2].as_str();
    let write = args[3] == "w";
    let random = args[4] == "r";
    let win: usize = args.get(5).map(|s| s.parse().unwrap()).unwrap_or(512);
    let workers: usize = args.get(6).map(|s| s.parse().unwrap()).unwrap_or(2);
    let bytes = std::fs::metadata(path).unwrap().len();
    let image = if args[2] == "zch" { Image::load_hugetlb(path).unwrap() } else { Image::load(path).unwrap() };
    let _ = std::fs::read(path).unwrap();
    let ranges = [(GuestAddress(0), bytes as usize)];
    let mut v = Vec::new();
    let reps: usize = std::env::var("REPS").map(|s| s.parse().unwrap()).unwrap_or(7);
    for _ in 0..reps {
        let mut cfg = Config { image_window: win, workers, ..Config::default() };
        if let Ok(v) = std::env::var("MAXW") { cfg.max_window = v.parse().unwrap(); }
        if let Ok(v) = std::env::var("SPIN") { cfg.spin = std::time::Duration::from_micros(v.parse().unwrap()); }
        match std::env::var("DISPATCH").as_deref() { Ok("inline") => cfg.dispatch = apf::Dispatch::Inline, Ok("workers") => cfg.dispatch = apf::Dispatch::Workers, _ => {} }
        let secs = match mode {
            "kernel" => {
                let f = std::fs::File::open(path).unwrap();
                let p = unsafe { libc::mmap(std::ptr::null_mut(), bytes as usize, 3, libc::MAP_PRIVATE, f.as_raw_fd(), 0) };
                unsafe { libc::madvise(p, bytes as usize, libc::MADV_NOHUGEPAGE) };
                if std::env::var_os("PRE").is_some() {
                    let t = Instant::now();
                    unsafe { libc::madvise(p, bytes as usize, libc::MADV_POPULATE_READ) };
                    eprintln!("populate {:?}", t.elapsed());
                }
                let s = touch(p as usize, bytes / 4096, write, random);
                unsafe { libc::munmap(p, bytes as usize) };
                s
            }
            "zc" | "zch" => {
                let r = Arc::new(GuestRam::image(&ranges, image.clone()).unwrap());
                let src = r.image_source().unwrap();
                let e = Engine::builder(r.clone(), src).config(cfg).start().unwrap();
                if std::env::var_os("PRE").is_some() {
                    let t = Instant::now();
                    e.prefetch(apf::GuestRange::new(GuestAddress(0), bytes)).unwrap();
                    eprintln!("prefetch {:?}", t.elapsed());
                }
                let s = touch(r.regions()[0].host_base() as usize, bytes / 4096, write, random);
                if std::env::var_os("STATS").is_some() { eprintln!("{:?}", e.stats()); }
                drop(e); s
            }
            "copy" | "huge" => {
                let r = if mode == "copy" { GuestRam::anonymous(&ranges) } else { GuestRam::anonymous_hugetlb(&ranges, false) };
                let r = Arc::new(r.unwrap());
                let src = Arc::new(SnapshotFile::open(path, &r).unwrap());
                let e = Engine::builder(r.clone(), src).config(cfg).start().unwrap();
                let s = touch(r.regions()[0].host_base() as usize, bytes / 4096, write, random);
                drop(e); s
            }
            _ => panic!(),
        };
        v.push(bytes as f64 / secs / 1e9);
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!("{mode} w={write} r={random} win={win}: median {:.2} GB/s  all {:?}", v[v.len() / 2], v.iter().map(|x| (x * 100.0).round() / 100.0).collect::<Vec<_>>());
}

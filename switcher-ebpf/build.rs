//! Rebuilds the program when bpf-linker changes (the aya-template does the same): cargo does not
//! know that the linker is an input of this crate.
use which::which;

fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo::rerun-if-changed={}", path.display()),
        Err(err) => println!("cargo::warning=bpf-linker not found on PATH ({err}); run ./x to install it"),
    }
}

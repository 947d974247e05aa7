/* hide_avx512.c: an LD_PRELOAD library under which a process sees an AVX2 CPU.
 *
 * Runtimes such as ONNX Runtime (MLAS) pick their kernels from CPUID and have no switch to cap
 * the ISA. Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID, per thread, inherited by new
 * threads) makes every CPUID instruction raise SIGSEGV; the handler below executes it with
 * faulting off, clears the AVX-512 and AVX-VNNI feature bits and steps over the instruction.
 * The instructions themselves still run: only what CPUID reports changes.
 *
 * SIGSEGV handlers the process installs later (Python's faulthandler, ...) are kept and
 * called for every other fault: sigaction() and signal() on SIGSEGV are interposed.
 * tvm_sparse_cpuid_traps() returns how many CPUID instructions were answered.
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

/* Leaf 7, subleaf 0. EBX: AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31. */
#define L7_EBX_HIDDEN 0xDC230000u
/* ECX: VBMI 1, VBMI2 6, VNNI 11, BITALG 12, VPOPCNTDQ 14. */
#define L7_ECX_HIDDEN 0x00005842u
/* EDX: 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, FP16 23. */
#define L7_EDX_HIDDEN 0x0080010Cu
/* Leaf 7, subleaf 1, EAX: AVX-VNNI 4, AVX512_BF16 5. */
#define L71_EAX_HIDDEN 0x00000030u

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);

static sigaction_fn real_sigaction; /* libc's */
static struct sigaction next_segv;  /* what the process asked for SIGSEGV after us */
static volatile long traps;
static int installed;

long tvm_sparse_cpuid_traps(void) { return traps; }

static long set_cpuid_enabled(int on) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, on); }

static void forward(int sig, siginfo_t *info, void *ctx) {
    if (next_segv.sa_flags & SA_SIGINFO) {
        next_segv.sa_sigaction(sig, info, ctx);
    } else if (next_segv.sa_handler != SIG_DFL && next_segv.sa_handler != SIG_IGN) {
        next_segv.sa_handler(sig);
    } else {
        /* Default action: return and let the fault happen again, unhandled. */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        real_sigaction(SIGSEGV, &dfl, NULL);
    }
}

static void on_segv(int sig, siginfo_t *info, void *ctx) {
    greg_t *reg = ((ucontext_t *)ctx)->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)reg[REG_RIP];
    /* A faulting CPUID arrives as SI_KERNEL at a readable RIP; page faults carry SEGV_*. */
    if (info->si_code != SI_KERNEL || ip[0] != 0x0F || ip[1] != 0xA2) {
        forward(sig, info, ctx);
        return;
    }
    unsigned leaf = (unsigned)reg[REG_RAX], sub = (unsigned)reg[REG_RCX];
    unsigned a, b, c, d;
    set_cpuid_enabled(1);
    __cpuid_count(leaf, sub, a, b, c, d);
    set_cpuid_enabled(0);
    if (leaf == 7 && sub == 0) {
        b &= ~L7_EBX_HIDDEN;
        c &= ~L7_ECX_HIDDEN;
        d &= ~L7_EDX_HIDDEN;
    } else if (leaf == 7 && sub == 1) {
        a &= ~L71_EAX_HIDDEN;
    }
    reg[REG_RAX] = a;
    reg[REG_RBX] = b;
    reg[REG_RCX] = c;
    reg[REG_RDX] = d;
    reg[REG_RIP] += 2;
    traps++;
}

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (!real_sigaction) real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    if (sig != SIGSEGV || !installed) return real_sigaction(sig, act, old);
    struct sigaction prev = next_segv;
    if (act) next_segv = *act;
    if (old) *old = prev;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
    struct sigaction act, old;
    memset(&act, 0, sizeof act);
    act.sa_handler = handler;
    act.sa_flags = SA_RESTART;
    sigemptyset(&act.sa_mask);
    return sigaction(sig, &act, &old) == 0 ? old.sa_handler : SIG_ERR;
}

__attribute__((constructor)) static void hide_avx512(void) {
    struct sigaction act;
    memset(&act, 0, sizeof act);
    act.sa_sigaction = on_segv;
    act.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&act.sa_mask);
    if (!real_sigaction) real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    if (real_sigaction(SIGSEGV, &act, &next_segv) != 0) return;
    if (set_cpuid_enabled(0) != 0) { /* no CPUID faulting here: leave the process as it was */
        real_sigaction(SIGSEGV, &next_segv, NULL);
        return;
    }
    installed = 1;
}

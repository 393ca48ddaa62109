/* A process in a fake container, for llamaprobe's hostile_files tests (agent/tests/it/
 * hostile_files.rs). It looks like a llama.cpp process only as far as finding its model goes:
 * `-m PATH` on its command line.
 *
 *   target -m PATH [--map] [--cover LINK_TARGET]
 *
 * --map    maps PATH (as llama.cpp maps its model) and closes it: only the mapping is left.
 * --cover  then mounts a tmpfs over PATH's directory (in its own mount namespace: run it under
 *          `unshare --mount`) and puts there a symbolic link named like PATH to LINK_TARGET:
 *          the mapped file's path now leads elsewhere.
 *
 * Prints "ready" when done, then waits until its stdin closes. Built with gcc -static, so a
 * root directory holding nothing else can run it.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

int main(int argc, char **argv) {
    const char *model = NULL, *cover = NULL;
    int map = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-m") && i + 1 < argc)
            model = argv[++i];
        else if (!strcmp(argv[i], "--map"))
            map = 1;
        else if (!strcmp(argv[i], "--cover") && i + 1 < argc)
            cover = argv[++i];
    }
    if (map && model) {
        struct stat st;
        int fd = open(model, O_RDONLY);
        if (fd < 0 || fstat(fd, &st) < 0) {
            perror(model);
            return 1;
        }
        if (mmap(NULL, st.st_size, PROT_READ, MAP_SHARED, fd, 0) == MAP_FAILED) {
            perror("mmap");
            return 1;
        }
        close(fd);
    }
    if (cover && model) {
        char dir[4096];
        snprintf(dir, sizeof dir, "%s", model);
        if (mount("tmpfs", dirname(dir), "tmpfs", 0, "size=1m") < 0) {
            perror("mount");
            return 1;
        }
        if (symlink(cover, model) < 0) {
            perror("symlink");
            return 1;
        }
    }
    printf("ready\n");
    fflush(stdout);
    char b;
    while (read(0, &b, 1) > 0) {
    }
    return 0;
}

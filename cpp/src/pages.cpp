#include "pages.h"

#ifdef __linux__
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#endif

namespace gemma {

void settle_weights(const std::string& path) {
#ifdef __linux__
  char real[PATH_MAX];
  if (::realpath(path.c_str(), real) == nullptr) return;
  int fd = ::open(real, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  ::fdatasync(fd);  // a page not yet written back (a build just made the file) would stay
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
  // /proc/self/maps: "start-end perms offset dev inode   path"
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    std::istringstream fields(line);
    std::string range, perms, offset, dev, inode;
    if (!(fields >> range >> perms >> offset >> dev >> inode)) continue;
    std::string mapped;
    std::getline(fields >> std::ws, mapped);
    if (mapped != real) continue;
    size_t dash = range.find('-');
    unsigned long long start = std::stoull(range.substr(0, dash), nullptr, 16);
    unsigned long long end = std::stoull(range.substr(dash + 1), nullptr, 16);
    ::madvise(reinterpret_cast<void*>(start), end - start, MADV_RANDOM);
  }
#else
  (void)path;
#endif
}

}  // namespace gemma

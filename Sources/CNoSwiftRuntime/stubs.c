// SwiftPM links every product through the Swift driver, which adds the Swift runtime's image
// constructor (swiftrt.o). sandpiper-init and libSandpiperForker.so are plain C and link no Swift
// runtime (the sandboxes that run them bind none; linked statically, the runtime made
// sandpiper-init 6.7 MB, faulted in and initialised at every session's start): the constructor's
// two references resolve to these no-ops.
#include "no_swift_runtime.h"

void swift_addNewDSOImage(const void *image) { (void)image; }

int _swift_backtrace_isThunkFunction(const char *name) {
    (void)name;
    return 0;
}

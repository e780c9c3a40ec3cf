// No-op stand-ins for the two Swift runtime entry points swiftrt.o refers to (see stubs.c).
#ifndef SANDPIPER_NO_SWIFT_RUNTIME_H
#define SANDPIPER_NO_SWIFT_RUNTIME_H

void swift_addNewDSOImage(const void *image);
int _swift_backtrace_isThunkFunction(const char *name);

#endif

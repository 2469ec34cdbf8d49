//! The root of every Zig agent's module: `torpor build` compiles this file with the
//! agent's `agent.zig` (or `main.zig`) as the module `agent` and `torpor.zig` as the
//! module `torpor`. It provides what ABI v1 asks of a guest, so the agent's own file
//! holds nothing but `pub fn main() !void`:
//!
//! * the export `torpor_main`, which runs `agent.main` and turns what it returns into
//!   the ABI's answer (0, or 1 with the error logged: `agent_error`);
//! * the Asyncify buffer `__torpor_async` (ABI section 7), 16 KiB unless the agent
//!   declares `pub const torpor_async_stack = N;`;
//! * the panic handler and `std.log`'s output, both into the host.

const std = @import("std");
const torpor = @import("torpor");
const agent = @import("agent");

pub const panic = std.debug.FullPanic(torpor.panicHandler);

pub const std_options: std.Options = .{
    .logFn = torpor.logFn,
    .log_level = if (@hasDecl(agent, "torpor_log_level")) agent.torpor_log_level else .info,
};

const async_stack: usize = if (@hasDecl(agent, "torpor_async_stack")) agent.torpor_async_stack else 16 * 1024;

/// Laid out as Asyncify expects (`cur`, `end`, then the frames), statically
/// initialised so that the pristine image holds `cur0 = A + 8`, `end0 = A + 8 + N`.
const AsyncBuf = extern struct { cur: [*]u8, end: [*]u8, data: [async_stack]u8 };

export var __torpor_async: AsyncBuf = .{
    .cur = &__torpor_async.data,
    .end = @as([*]u8, &__torpor_async.data) + async_stack,
    .data = @splat(0),
};

comptime {
    if (!@hasDecl(agent, "main"))
        @compileError("the agent declares no `pub fn main() !void` (or `pub fn main() void`)");
}

export fn torpor_main() i32 {
    const Main = @TypeOf(agent.main);
    const info = @typeInfo(Main);
    if (info != .@"fn" or info.@"fn".param_types.len != 0)
        @compileError("the agent's main must be `pub fn main() !void` (or `void`), not " ++ @typeName(Main));
    const R = info.@"fn".return_type.?;
    switch (@typeInfo(R)) {
        .void => agent.main(),
        .error_union => |eu| {
            if (eu.payload != void) @compileError("the agent's main must return `!void`, not " ++ @typeName(R));
            agent.main() catch |err| return failed(err);
        },
        else => @compileError("the agent's main must return `!void` (or `void`), not " ++ @typeName(R)),
    }
    return 0;
}

/// Log why `main` failed (unless `torpor.fail` already said) and answer `agent_error`;
/// out of memory is the host's `memory_limit`.
fn failed(err: anyerror) i32 {
    if (err == error.OutOfMemory) torpor.outOfMemory();
    if (err == error.AgentFailed) return 1;
    if (torpor.lastFailure()) |f| {
        if (f.err == err) {
            torpor.log(.err, "{s} failed: {s}: {s}", .{ f.tool, f.code, f.message });
            return 1;
        }
    }
    torpor.log(.err, "main returned error.{s}", .{@errorName(err)});
    return 1;
}
